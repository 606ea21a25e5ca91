"""The source hash of ``mmpsa._ext``: which C++ sources a binary was built from.

``setup.py`` compiles the hash of ``mmpsa/csrc`` into the extension and
:func:`mmpsa.layers.dispatch._load_extension` compares it with the sources beside the
package, so a binary built from other code is refused. Both use :func:`source_hash`;
``setup.py`` loads this file by path (it imports nothing but the standard library).
"""
import hashlib
import os
import os.path as osp

#: ``mmpsa/csrc``, the extension's sources (present in a source checkout).
CSRC_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'csrc')


def source_hash(csrc_dir: str = CSRC_DIR) -> str:
    """sha256[:16] over every file directly in ``csrc_dir``: sorted names and contents.

    Args:
        csrc_dir (str): The sources' folder. Default: ``mmpsa/csrc``.

    Returns:
        str: 16 hex digits.
    """
    digest = hashlib.sha256()
    for name in sorted(os.listdir(csrc_dir)):
        path = osp.join(csrc_dir, name)
        if not osp.isfile(path):
            continue
        with open(path, 'rb') as f:
            data = f.read()
        # name and length first, so no two different trees hash alike
        digest.update(f'{name}\0{len(data)}\0'.encode())
        digest.update(data)
    return digest.hexdigest()[:16]
