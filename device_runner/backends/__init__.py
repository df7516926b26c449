"""Backends behind two small interfaces.

* a *prefix* maps a float32 input batch to the features of the frozen blocks
  (``forward(x) -> features``; ``name`` says which runtime ran it);
* a *suffix trainer* runs ``train_step``/``eval_step`` on the sparse suffix and exposes its
  parameters by name (``get_parameter``/``set_parameter``) and ``save``.
"""
