"""What exists only because HydraLoRA lives outside PEFT's source tree, and nothing else.

Inside PEFT (``peft/tuners/hydralora/``, as ``make peft-conformance`` builds it) none of this is needed: the tuner
files import from peft directly, ``PeftType.HYDRALORA`` is an enum member and ``register_peft_method`` is one line.

- ``registry.py``: adds the ``HYDRALORA`` member to ``peft.utils.PeftType`` (PEFT only registers existing members)
  and registers through PEFT's own ``register_peft_method``;
- ``compat.py``: every PEFT internal the tuner uses, feature-detected for peft 0.18-0.21 (a clear ImportError when
  one is gone), and the equivalents of the state-dict helpers peft < 0.21 lacks;
- ``tuner.py``: the class registered with PEFT: the tuner plus the Hub tags, and on peft < 0.21 the checkpoint
  upgrade and strict check on load, and one adapter per file on save, which newer peft gets from the tuner itself;
- ``card.py``: the usage snippet of the model card and a ``push_to_hub`` that keeps it;
- ``src/_peft_hydra_autoload.py`` (outside the package: a ``.pth`` start-up hook imports it): registers HydraLoRA
  as soon as a program imports peft, so adapters load without ``import peft_hydra``.

None of it patches a class or an instance of PEFT or transformers.
"""
