"""HydraLoRA in the fine-tuning frameworks people train with (docs/training.md, "In axolotl, ms-swift and LLaMA-Factory").

One module per framework; each imports its framework, so none is imported by ``import peft_hydra`` and none of the
frameworks is a dependency of this package (each brings its own pins: install the framework, then peft-hydra):

- :mod:`peft_hydra.frameworks.axolotl`: an axolotl plugin (``plugins: [peft_hydra.frameworks.axolotl.HydraLoraPlugin]``,
  ``adapter: hydralora``); ``axolotl train config.yml``.
- :mod:`peft_hydra.frameworks.ms_swift`: an ms-swift tuner plugin; ``peft-hydra-swift sft config.yaml`` hands over to
  ``swift sft`` with the plugin file as ``--external_plugins``.
- :mod:`peft_hydra.frameworks.llamafactory`: a LLaMA-Factory v1 ``PeftPlugin`` (``peft_config: {name: hydralora}``);
  ``peft-hydra-llamafactory sft config.yaml`` imports it and hands over to LLaMA-Factory's v1 launcher.

:mod:`peft_hydra.frameworks._common` holds what they share: the option names and the one builder of the
``HydraLoraConfig`` from a framework's options.
"""
