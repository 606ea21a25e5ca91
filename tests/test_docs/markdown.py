"""Reading the documentation's Markdown: runnable command blocks, links and heading anchors.

The one rule for commands the tests run: a fenced ``bash`` block directly after a line
``<!-- runnable -->`` (blank lines between are allowed). Its commands are its lines, comments and
blank lines dropped, a line ending in ``\\`` joined with the next.
"""
import re
from pathlib import Path
from typing import Iterator, List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[2]
RUNNABLE = '<!-- runnable -->'
#: The Markdown the link test reads: the front page and every page of the docs.
DOC_FILES = [REPO / 'README.md'] + sorted((REPO / 'docs').rglob('*.md'))
#: The files whose runnable blocks the command test runs.
COMMAND_FILES = [REPO / 'README.md', REPO / 'docs' / 'en' / 'get_started.md']

FENCE = re.compile(r'^(`{3,}|~{3,})\s*([\w{}-]*)')
LINK = re.compile(r'(?<!!)\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')


def blocks(text: str) -> Iterator[Tuple[int, str, List[str], bool]]:
    """``(line number, language, lines, runnable)`` of every fenced block."""
    lines = text.split('\n')
    i, marked = 0, False
    while i < len(lines):
        line = lines[i]
        match = FENCE.match(line)
        if not match:
            if line.strip() == RUNNABLE:
                marked = True
            elif line.strip():
                marked = False
            i += 1
            continue
        fence, language, start = match.group(1), match.group(2), i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        yield start, language, body, marked
        marked = False
        i += 1


def commands(body: List[str]) -> List[str]:
    """The commands of a bash block: comment-only and blank lines dropped, continuations
    joined (trailing comments stay: bash reads them as comments)."""
    out, pending = [], ''
    for line in body:
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith('#')):
            continue
        if stripped.endswith('\\'):
            pending += stripped[:-1].rstrip() + ' '
            continue
        out.append(pending + stripped)
        pending = ''
    if pending:
        out.append(pending.strip())
    return out


def runnable_commands(path: Path) -> List[Tuple[str, str]]:
    """``(where, command)`` for every command of the runnable bash blocks of a file."""
    found = []
    for line, language, body, marked in blocks(path.read_text()):
        if marked and language == 'bash':
            found += [(f'{path.relative_to(REPO)}:{line}', c) for c in commands(body)]
    return found


def prose(text: str, code_spans: bool = False) -> str:
    """The text outside fenced blocks, without its code spans unless ``code_spans`` (outside
    code a link is a link)."""
    kept, inside = [], None
    for line in text.split('\n'):
        match = FENCE.match(line)
        if inside is None and match:
            inside = match.group(1)
            continue
        if inside is not None:
            if line.startswith(inside):
                inside = None
            continue
        kept.append(line if code_spans else re.sub(r'`[^`]*`', '', line))
    return '\n'.join(kept)


def links(path: Path) -> List[str]:
    """Every link target of a Markdown file (outside code)."""
    return LINK.findall(prose(path.read_text()))


def slug(heading: str) -> str:
    """The anchor of a heading, as GitHub and MyST (``myst_heading_anchors``) make it."""
    text = re.sub(r'`([^`]*)`', r'\1', heading.strip().lower())
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text)
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(path: Path) -> Set[str]:
    """The heading anchors of a Markdown file (duplicates get GitHub's ``-1``, ``-2``)."""
    seen: dict = {}
    out = set()
    for line in prose(path.read_text(), code_spans=True).split('\n'):
        match = re.match(r'^(#{1,6})\s+(.*?)\s*#*\s*$', line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f'{base}-{count}')
    return out


def broken_link(source: Path, target: str) -> Optional[str]:
    """Why a relative link of ``source`` does not resolve, or None (external links, mail and
    pure in-page anchors of other kinds are not checked here: nothing is fetched)."""
    if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:, ...
        return None
    path, _, anchor = target.partition('#')
    file = (source.parent / path).resolve() if path else source
    if not file.exists():
        return f'{target}: no file {file}'
    if anchor and file.suffix == '.md' and anchor not in anchors(file):
        return f'{target}: no heading with anchor #{anchor} in {file.name}'
    return None
