# The tiny table: what `make demo` runs (python tools/reproduce.py tiny). Synthetic tiny
# Cityscapes- and COCO-format data, generated under WORK_DIR/data; every model trains on a CPU
# in seconds. It says how these models do on that data, nothing about Cityscapes or COCO.
# Rows: see mmpsa/analysis/reproduce.py. Paths are relative to mmpsa's configs/ folder.
title = 'Tiny synthetic data, CPU (the demo)'
task = 'Demo'
dataset = 'tiny synthetic data'
data = 'tiny'  # generate the tiny sets and point every config at them
attention = True  # attention pictures of every trained PSA model
# The same CPU numerics on every x86 machine: a fixed thread count (reductions split the same
# way) and the AVX2 code paths of torch's kernels, oneDNN and MKL, also on AVX-512 machines
# (with the package versions of the lock, requirements/lock/, the numbers then repeat exactly).
env = dict(
    OMP_NUM_THREADS=2,
    MKL_NUM_THREADS=2,
    ATEN_CPU_CAPABILITY='avx2',
    ONEDNN_MAX_CPU_ISA='AVX2',
    MKL_CBWR='AVX2')
note = ('Synthetic tiny data, fixed seed, each model trained and tested through the real '
        'mmseg / mmpose runners; the stock twins are the stock tiny configs.')

seg_stock = 'mmseg/tiny/fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py'
pose_stock = 'mmpose/tiny/td-hm_hrnet-tiny_1xb16-5e_tinycoco-96x64.py'
seg = dict(metric='mIoU', label='mIoU', scale=1.0, checkpoint='last', stock=seg_stock)
pose = dict(metric='coco/AP', label='AP', scale=100.0, checkpoint='last', stock=pose_stock)
rows = [
    dict(psa='mmseg/tiny/psa-p_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py', **seg),
    dict(psa='mmseg/tiny/psa-s_fcn_hr-tiny_1xb4-100iter_tiny-cityscapes-64x128.py', **seg),
    dict(psa='mmpose/tiny/td-hm_psa-p-hrnet-tiny_1xb16-5e_tinycoco-96x64.py', **pose),
    dict(psa='mmpose/tiny/td-hm_psa-s-hrnet-tiny_1xb16-5e_tinycoco-96x64.py', **pose),
]
