"""Does a checkpoint hold the model a config builds? The PSA record, keys and shapes, by purpose.

What a checkpoint holds is written as plain data at save time: :func:`psa_record` (the PSA
settings of each PSA-bearing module, in ``meta['psa']``). :func:`check_psa_match` compares it
and the state_dict's keys and shapes (:func:`key_diff`, one helper for every such check) with
the model a checkpoint is loaded into; the purpose decides what is an error. A checkpoint's
saved config text (``meta['cfg']``) is never parsed: mmengine's ``Config.fromstring``
executes it.
"""
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from mmengine.logging import print_log

from .errors import CheckpointMismatchError

#: Key of :func:`psa_record` in a checkpoint's ``meta``.
PSA_RECORD_KEY = 'psa'
#: What :func:`check_psa_match` is checking for.
LOAD_PURPOSES = ('resume', 'test', 'export', 'attention', 'load_from')
#: Purposes that evaluate the weights as they are: missing or reshaped keys are errors.
EVAL_PURPOSES = ('test', 'export', 'attention')


def psa_record(model: torch.nn.Module) -> Dict[str, Dict[str, Any]]:
    """The PSA settings of a model, as plain data for a checkpoint's ``meta``.

    One entry per PSA-bearing module path: a backbone built with ``psa=dict(...)`` gives
    ``dict(variant, mode, stages, blocks)`` (``stages`` with the defaults filled in); a block
    outside such a backbone (a head's, a neck's) gives ``dict(variant, mode, in_channels)``
    under its own path. A model without PSA gives ``{}``. The evaluation path (``fused``)
    is not part of the model and is not recorded.

    Args:
        model: The model (not wrapped).

    Returns:
        ``{module path: settings}``.
    """
    from ..insertion import parse_psa_cfg, residual_stages
    from ..layers import PolarizedSelfAttention
    owners = [
        name for name, module in model.named_modules()
        if getattr(module, 'psa_cfg', None) is not None
    ]
    modules = dict(model.named_modules())
    record: Dict[str, Dict[str, Any]] = {}
    for name, block in modules.items():
        if not isinstance(block, PolarizedSelfAttention):
            continue
        owner = next((o for o in owners if o == '' or name.startswith(o + '.')), None)
        if owner is None:
            record[name] = dict(
                variant=block.variant, mode=block.mode, in_channels=block.in_channels)
            continue
        if owner not in record:
            backbone = modules[owner]
            stages = parse_psa_cfg(backbone.psa_cfg, len(residual_stages(backbone)),
                                   type(backbone).__name__)['stages']
            record[owner] = dict(
                variant=block.variant, mode=block.mode, stages=list(stages), blocks=0)
        record[owner]['blocks'] += 1
    return record


def _describe(settings: Optional[Dict[str, Any]]) -> str:
    """One module's record entry as text."""
    if settings is None:
        return 'no PSA'
    return ', '.join(f'{key}={value!r}' for key, value in settings.items())


def _record_diff(saved: Dict[str, Any], current: Dict[str, Any], limit: int = 6) -> List[str]:
    """Lines naming each module whose PSA settings differ."""
    lines = [
        f'  {path or "(model)"}: checkpoint {_describe(saved.get(path))}; '
        f'config {_describe(current.get(path))}' for path in sorted(set(saved) | set(current))
        if saved.get(path) != current.get(path)
    ]
    if len(lines) > limit:
        lines = lines[:limit] + [f'  ... and {len(lines) - limit} more modules']
    return lines


def key_list(keys, limit: int = 5) -> str:
    """Some keys, and how many more."""
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


@dataclass
class KeyDiff:
    """How a checkpoint's state_dict differs from a model's (:func:`key_diff`)."""
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    #: ``(key, shape in the checkpoint, shape in the model)``.
    reshaped: List[Tuple[str, tuple, tuple]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.reshaped)

    def lines(self, limit: int = 8) -> List[str]:
        """One line per kind of difference (missing keys, unexpected keys, shape mismatches)."""
        reshaped = [
            f'{key}: {tuple(saved)} in the checkpoint, {tuple(own)} in the model'
            for key, saved, own in self.reshaped
        ]
        lines = []
        for title, keys in (('missing keys', self.missing), ('unexpected keys', self.unexpected),
                            ('shape mismatches', reshaped)):
            if keys:
                shown = ', '.join(keys[:limit])
                more = f', ... ({len(keys)} in all)' if len(keys) > limit else ''
                lines.append(f'  {title}: {shown}{more}')
        return lines


def key_diff(given: Mapping[str, Any], own: Mapping[str, Any]) -> KeyDiff:
    """Missing, unexpected and reshaped keys of a state_dict ``given`` for a model's ``own``.

    ``num_batches_tracked`` buffers missing from ``given`` are not counted (older
    checkpoints lack them; loading keeps the model's). Keys keep their state_dict order
    (the model's for missing and reshaped keys, the checkpoint's for unexpected ones), so
    a message lists a module's weight before its bias, module after module.

    Args:
        given: The checkpoint's state_dict (prefixes already stripped).
        own: The model's state_dict.
    """
    missing = [k for k in own if k not in given and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in given if k not in own]
    reshaped = []
    for key in own:
        shape = getattr(given.get(key), 'shape', None)
        if key in given and shape is not None and tuple(shape) != tuple(own[key].shape):
            reshaped.append((key, tuple(shape), tuple(own[key].shape)))
    return KeyDiff(missing, unexpected, reshaped)


def _strip_prefix(state: Dict[str, Any]) -> Dict[str, Any]:
    """Keys as the unwrapped model names them (mmengine strips ``module.`` the same way)."""
    return {re.sub(r'^module\.', '', key): value for key, value in state.items()}


def _state_dict_of(checkpoint: dict) -> Dict[str, Any]:
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else {}
    return _strip_prefix(state if isinstance(state, dict) else {})


def check_psa_match(checkpoint: dict,
                    model: torch.nn.Module,
                    filename: str,
                    purpose: str,
                    allow_missing_psa: bool = False) -> List[str]:
    """Refuse (or, for fine-tuning, report) a checkpoint whose model is not the config's.

    The checkpoint's :func:`psa_record` (``meta['psa']``), when it has one, is compared with
    the model's, and its state_dict's keys and shapes always are (:func:`key_diff`): the
    record tells the paper variant's parallel from its sequential mode, which keys cannot,
    and keys and shapes tell a 19-class head from a 5-class one, which the record cannot.
    Purposes:

    - ``'resume'``: any difference is an error (the run would go on with another model, or
      fail later in the optimizer's state).
    - ``'test'``, ``'export'``, ``'attention'``: other PSA settings, missing and reshaped keys
      are errors, unexpected keys a warning; a checkpoint without any PSA weights (stock) for
      a PSA config is an error unless ``allow_missing_psa`` (then a warning).
    - ``'load_from'`` (fine-tuning), as mmengine: never an error; tensors of other shapes (a
      new ``num_classes``) are skipped with a warning, PSA blocks without weights are listed
      once, differing PSA settings are a warning.

    Args:
        checkpoint: The loaded checkpoint dict.
        model: The model it is loaded into (not wrapped).
        filename: The checkpoint's name, for messages.
        purpose: One of :data:`LOAD_PURPOSES`.
        allow_missing_psa: Evaluation purposes only: a stock checkpoint is meant.

    Returns:
        The model's state_dict keys whose values loading must keep (accepted PSA keys that
        the checkpoint lacks, reshaped keys skipped in fine-tuning);
        :func:`keep_missing_psa` fills them in so that mmengine's loader does not list them
        again.

    Raises:
        CheckpointMismatchError: As above, naming the file and what differs.
        ValueError: For an unknown ``purpose``.
    """
    if purpose not in LOAD_PURPOSES:
        raise ValueError(f'purpose must be one of {LOAD_PURPOSES}, got {purpose!r}')
    from ..layers import PolarizedSelfAttention
    current = psa_record(model)
    saved = ((checkpoint.get('meta') or {})
             if isinstance(checkpoint, dict) else {}).get(PSA_RECORD_KEY)
    state = _state_dict_of(checkpoint)
    model_state = model.state_dict()
    blocks = [
        name for name, module in model.named_modules() if isinstance(module, PolarizedSelfAttention)
    ]
    psa_keys = {key for key in model_state if any(key.startswith(b + '.') for b in blocks)}
    diff = key_diff(state, model_state)
    missing_psa = set(diff.missing) & psa_keys
    stock = bool(blocks) and psa_keys <= (set(model_state) - set(state)) and not saved
    head = f'{purpose}: checkpoint {filename!r}'

    if purpose == 'load_from':
        without = [b for b in blocks if any(k.startswith(b + '.') for k in missing_psa)]
        if without:
            print_log(
                f'{head} has no weights for {len(without)} of the {len(blocks)} PSA blocks '
                f'of this model; they keep their initialisation: {", ".join(without)}',
                logger='current',
                level=logging.WARNING)
        if diff.reshaped:
            print_log(
                f'{head}: {len(diff.reshaped)} tensors of other shapes are skipped (they keep '
                'their initialisation, as mmengine does when fine-tuning):\n' +
                '\n'.join(KeyDiff(reshaped=diff.reshaped).lines()),
                logger='current',
                level=logging.WARNING)
        if saved and saved != current:
            print_log(
                f'{head} was trained with other PSA settings (fine-tuning goes on):\n' +
                '\n'.join(_record_diff(saved, current)),
                logger='current',
                level=logging.WARNING)
        return sorted(missing_psa | {key for key, _, _ in diff.reshaped})

    accepted: List[str] = []
    stock_ok = stock and purpose in EVAL_PURPOSES and allow_missing_psa
    if stock_ok:
        print_log(
            f'{head} has no PSA weights: the {len(blocks)} PSA blocks of this model are '
            f'used at their initialisation (--allow-missing-psa).',
            logger='current',
            level=logging.WARNING)
        accepted = sorted(missing_psa)
        diff.missing = [key for key in diff.missing if key not in missing_psa]
    problems: List[str] = []
    if saved is not None and not stock_ok:
        problems += _record_diff(saved, current)
    if purpose == 'resume':
        problems += diff.lines()
    else:
        problems += KeyDiff(missing=diff.missing, reshaped=diff.reshaped).lines()
    if not problems:
        if diff.unexpected and purpose != 'resume':
            print_log(
                f'{head}: {len(diff.unexpected)} keys in the checkpoint that the model lacks '
                f'are not used: {key_list(diff.unexpected)}',
                logger='current',
                level=logging.WARNING)
        return accepted
    source = ("its PSA record (meta['psa']), keys and shapes"
              if saved is not None else 'its state_dict keys and shapes (no PSA record)')
    hint = ''
    if stock and purpose in EVAL_PURPOSES:
        hint = ('\nIt holds no PSA weights (a stock checkpoint?): to use the PSA blocks at '
                'their initialisation on purpose, pass --allow-missing-psa.')
    elif purpose == 'resume':
        hint = ('\nResume from a checkpoint of this config, or start a new run with '
                'load_from=... to fine-tune from it.')
    raise CheckpointMismatchError(
        f'{head} does not hold the model this config builds, by {source}:\n' + '\n'.join(problems) +
        hint)


def keep_missing_psa(checkpoint: dict, model: torch.nn.Module, keys: List[str]) -> None:
    """Put the model's own values of ``keys`` into the checkpoint's state_dict.

    Loading then leaves those tensors as they are (their initialisation), and mmengine's
    list of missing keys does not repeat what :func:`check_psa_match` has already listed.

    Args:
        checkpoint: The loaded checkpoint dict; changed in place.
        model: The model it is loaded into (not wrapped).
        keys: State_dict keys of ``model``.
    """
    state = checkpoint['state_dict'] if 'state_dict' in checkpoint else checkpoint
    prefix = 'module.' if state and all(k.startswith('module.') for k in state) else ''
    model_state = model.state_dict()
    for key in keys:
        state[prefix + key] = model_state[key]
