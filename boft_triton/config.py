"""``BOFTConfig``: PEFT's BOFT configuration, same fields, defaults, checks and JSON file."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from .io_utils import atomic_write_text

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "BOFT"
BIAS_MODES = ("none", "all", "boft_only")
# PEFT's TaskType values (peft.TaskType is a str enum, so its members compare equal to these).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


@dataclass
class BOFTConfig:
    """Configuration of a BOFT adapter; a field-for-field match of ``peft.BOFTConfig``.

    Exactly one of ``boft_block_size`` and ``boft_block_num`` is non-zero; the other follows per
    layer from the layer's input width. ``boft_n_butterfly_factor=1`` is OFT.
    """

    peft_type: Optional[str] = None
    auto_mapping: Optional[dict] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    task_type: Optional[str] = None
    inference_mode: bool = False
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    peft_version: Optional[str] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.peft_type not in (None, PEFT_TYPE):
            raise ValueError(f"BOFTConfig got peft_type={self.peft_type!r}; this is a config for {PEFT_TYPE!r} adapters.")
        self.peft_type = PEFT_TYPE
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        self.task_type = getattr(self.task_type, "value", self.task_type)  # peft.TaskType -> its string
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"Invalid task type: {self.task_type!r}. Must be one of {', '.join(TASK_TYPES)} (or None).")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ValueError(
                "Either `boft_block_size` or `boft_block_num` must be non-zero; set one of them "
                f"(got boft_block_size={self.boft_block_size}, boft_block_num={self.boft_block_num})."
            )
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise ValueError(
                f"You can only specify either boft_block_size ({self.boft_block_size}) or boft_block_num "
                f"({self.boft_block_num}), not both, because boft_block_size x boft_block_num == in_features; "
                "set the other to 0."
            )
        if self.boft_block_size < 0 or self.boft_block_num < 0:
            raise ValueError("`boft_block_size` and `boft_block_num` must not be negative.")
        if not isinstance(self.boft_n_butterfly_factor, int) or self.boft_n_butterfly_factor < 1:
            raise ValueError(
                f"`boft_n_butterfly_factor` must be a positive integer (1 is OFT), got {self.boft_n_butterfly_factor!r}."
            )
        if not 0.0 <= self.boft_dropout < 1.0:
            raise ValueError(f"`boft_dropout` must be in [0, 1), got {self.boft_dropout}.")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"`bias` must be one of {BIAS_MODES}, got {self.bias!r}.")

    # -- PEFT's adapter_config.json -------------------------------------------------------------

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["peft_version"] is None:
            data.pop("peft_version")
        return data

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text)

    @classmethod
    def from_dict(cls, data: dict) -> "BOFTConfig":
        peft_type = data.get("peft_type")
        if peft_type not in (None, PEFT_TYPE):
            raise ValueError(f"This adapter is of type {peft_type!r}, not {PEFT_TYPE!r}; boft_triton loads BOFT adapters only.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"Ignoring adapter config keys boft_triton does not know: {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None) -> "BOFTConfig":
        path = os.path.join(directory, subfolder or "", CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {os.path.dirname(path)!r}: is this an adapter directory?")
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); the adapter config is corrupt.") from err
        return cls.from_dict(data)
