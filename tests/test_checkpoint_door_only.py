"""Every checkpoint read in mmpsa/ and tools/ goes through the door (mmpsa/checkpoint/):
an ``ast`` walk finds the loaders that unpickle or fetch checkpoints nowhere else."""
import ast
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]

#: Dotted names that read checkpoints, and the only files that may use them.
LOADERS: Dict[str, str] = {
    'torch.load': 'mmpsa/checkpoint/door.py',
    'torch.hub.load_state_dict_from_url': '',
    'torch.hub.load': '',
    'torch.utils.model_zoo.load_url': '',
    'mmengine.utils.dl_utils.load_url': '',
    'mmengine.utils.load_url': '',
    'mmengine.runner.checkpoint._load_checkpoint': '',
    'mmengine.runner.checkpoint._load_checkpoint_with_prefix': '',
    'mmengine.runner.checkpoint.load_checkpoint': '',
    'mmengine.runner.load_checkpoint': '',
    'mmengine.runner.checkpoint.CheckpointLoader': 'mmpsa/checkpoint/door.py',
    'mmengine.runner.CheckpointLoader': 'mmpsa/checkpoint/door.py',
    'mmseg.apis.init_model': 'mmpsa/checkpoint/build.py',
    'mmseg.apis.inference.init_model': 'mmpsa/checkpoint/build.py',
    'mmpose.apis.init_model': 'mmpsa/checkpoint/build.py',
    'mmpose.apis.inference.init_model': 'mmpsa/checkpoint/build.py',
}


def _dotted(node: ast.AST) -> List[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return []


def loader_uses(source: str) -> List[tuple]:
    """``(line, dotted name)`` of every reference to a name in :data:`LOADERS`."""
    tree = ast.parse(source)
    aliases: Dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split('.')[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f'{node.module}.{alias.name}'
                aliases[alias.asname or alias.name] = full
                if full in LOADERS:
                    found.append((node.lineno, full))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and isinstance(
                getattr(node, 'ctx', None), ast.Load):
            parts = _dotted(node)
            if parts and parts[0] in aliases:
                full = '.'.join([aliases[parts[0]]] + parts[1:])
                if full in LOADERS:
                    found.append((node.lineno, full))
    return sorted(set(found))


def test_the_walk_finds_each_kind_of_use():
    source = '\n'.join([
        'import torch as T', 'import torch.hub', 'from mmseg.apis import init_model',
        'from mmengine.runner import checkpoint as ck', 'import mmengine.runner', 'T.load(f)',
        'torch.hub.load_state_dict_from_url(u)', 'init_model(c, f)', 'ck._load_checkpoint(f)',
        'mmengine.runner.load_checkpoint(m, f)', 'ck.CheckpointLoader.load_checkpoint(f)',
        'runner.load_checkpoint(f)'
    ])
    names = [name for _, name in loader_uses(source)]
    assert names.count('mmseg.apis.init_model') == 2  # the import and the call
    for name in ('torch.load', 'torch.hub.load_state_dict_from_url',
                 'mmengine.runner.checkpoint._load_checkpoint', 'mmengine.runner.load_checkpoint',
                 'mmengine.runner.checkpoint.CheckpointLoader'):
        assert name in names, name
    assert len(names) == 7  # a Runner's own load_checkpoint method is not a loader


def test_checkpoints_are_read_only_inside_the_door():
    files = sorted((REPO / 'mmpsa').rglob('*.py')) + sorted((REPO / 'tools').rglob('*.py'))
    assert len(files) > 30
    outside = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for line, name in loader_uses(path.read_text()):
            if LOADERS[name] != rel:
                outside.append(f'{rel}:{line}: {name}')
    assert not outside, 'checkpoint loaders outside the door:\n' + '\n'.join(outside)
