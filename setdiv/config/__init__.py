"""The typed config tree: every default lives here, YAML files are deltas.

`load(paths, overrides)` merges the YAML files in order over the dataclass defaults, then the
dotted `key=value` overrides. An unknown key, a value of the wrong type or a name that is not
one of its choices fails at merge; a number outside its field's range or not finite fails right
after. Either way `load` raises a `ConfigError` naming the file (or override) and the dotted
key. The resolved config is written next to a run with `save` and read back identically with
`load`.

    schema.py    the root: one field per section
    model.py     model.* and similarity: encoders, set modules, the set similarity, choices
    data.py      data.*: shards, sources, loader, transforms, protocol
    training.py  optim.* and train.*: parameter groups, schedule, precision, checkpoints
    objective.py the loss and collapse-guard sections
    rules.py     range checks of fields, ConfigError
    loading.py   load / override / save / to_yaml / paths: the only YAML reader in setdiv

Nothing here imports torch or another setdiv module but `setdiv.errors`, so launchers, sweep
drivers and `--help` load configs in well under a second.
"""

from setdiv.config.data import DataConfig, Protocol, SourceConfig
from setdiv.config.loading import _CHOICES, PATH_KEYS, load, override, paths, save, to_yaml
from setdiv.config.model import (
    ImageEncoderConfig,
    ImageEncoderName,
    ModelConfig,
    SetModuleConfig,
    SetModuleName,
    SimilarityConfig,
    SimilarityName,
    TextEncoderConfig,
    TextEncoderName,
    TokenizerName,
)
from setdiv.config.objective import CollapseConfig, LossConfig
from setdiv.config.rules import ConfigError
from setdiv.config.schema import Config
from setdiv.config.training import LR_GROUPS, OptimConfig, ParamGroup, TrainConfig

__all__ = [
    "CollapseConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ImageEncoderConfig",
    "ImageEncoderName",
    "LR_GROUPS",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PATH_KEYS",
    "ParamGroup",
    "Protocol",
    "SetModuleConfig",
    "SetModuleName",
    "SimilarityConfig",
    "SimilarityName",
    "SourceConfig",
    "TextEncoderConfig",
    "TextEncoderName",
    "TokenizerName",
    "TrainConfig",
    "load",
    "override",
    "paths",
    "save",
    "to_yaml",
    "_CHOICES",
]
