"""The user's API: train and test a config (:mod:`.runner`), its parameters and FLOPs against
the stock model (:mod:`.complexity`), PSA attention maps (:mod:`.attention`); each is the
library side of a thin CLI in ``tools/``. The project's own maintenance code is in
:mod:`mmpsa.utils`."""
