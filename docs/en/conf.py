"""Sphinx configuration of mmpsa's documentation (Markdown through MyST).

Built by ``make docs``: ``sphinx-build -W --keep-going -n`` (every warning an error, nitpicky
cross-references), no network: external links are not fetched, only internal links and
heading anchors are resolved (``myst_heading_anchors``).
"""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, ROOT)

project = 'mmpsa'
author = 'mmpsa contributors'
copyright = 'mmpsa contributors, Apache-2.0'
release = '0.1.0'

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
]
source_suffix = {'.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build']
language = 'en'

# Markdown: `page.md#heading` links resolve (and warn when missing) down to level-3 headings.
myst_heading_anchors = 3
myst_enable_extensions = ['colon_fence']

# The API pages: docstrings in Google style; members in source order; type hints in the
# description. The OpenMMLab/torch classes they name are not documented here (no intersphinx:
# nothing is fetched), so references into those libraries are not resolved.
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_default_options = {'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpick_ignore_regex = [
    (r'py:.*', r'(torch|mmengine|mmcv|mmseg|mmpose|mmdet|numpy|np|nn|Tensor|triton)(\..*)?'),
    (r'py:.*', r'(typing|collections|pathlib|contextlib|argparse|enum)\..*'),
    (r'py:class', r'(optional|callable|ConfigLike|Path|PathLike)'),
    # mmpsa's own modules outside the public API pages (internals, the checkpoint door, utils)
    (r'py:.*', r'mmpsa\.(layers\.(dispatch|psa_fused)|utils|checkpoint|seg\.heads\._\w+)(\..*)?'),
    # names the docstrings give relative to their own module (Sphinx resolves only dotted
    # paths it documents)
    (r'py:.*', r'(runner|complexity|attention|dispatch|BACKENDS|PSA_DEFAULTS|'
     r'CheckpointMismatchError|BaseModule\..*)'),
]

html_theme = 'alabaster'
html_title = 'mmpsa'
html_static_path = []
