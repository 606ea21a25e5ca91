"""The README is a front page (at most 200 lines) and every relative link in the README and the
docs points at a file that exists (and, into Markdown, at a heading that exists). No network."""
import pytest

from .markdown import DOC_FILES, REPO, anchors, broken_link, links, slug

README_MAX_LINES = 200


def test_readme_is_a_front_page():
    lines = (REPO / 'README.md').read_text().count('\n')
    assert lines <= README_MAX_LINES, f'README.md has {lines} lines (at most {README_MAX_LINES})'


@pytest.mark.parametrize('path', DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    found = links(path)
    broken = [why for why in (broken_link(path, t) for t in found) if why]
    assert not broken, f'{path.relative_to(REPO)}:\n' + '\n'.join(broken)


def test_the_readme_links_into_the_docs():
    targets = links(REPO / 'README.md')
    assert any(t.startswith('docs/en/') for t in targets), targets
    assert 'docs/en/notes/limits.md' in targets


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('# A `code` heading (x)\n\n[ok](#a-code-heading-x) [bad](#nope) '
                    '[gone](missing.md) [web](https://example.invalid/x)\n')
    assert slug('A `code` heading (x)') == 'a-code-heading-x'
    assert anchors(page) == {'a-code-heading-x'}
    found = links(page)
    assert [bool(broken_link(page, t)) for t in found] == [False, True, True, False]
