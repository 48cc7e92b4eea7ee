from dataclasses import dataclass


@dataclass
class LoadConfig:
    load_format: str = "auto"
    device: str | None = None


@dataclass
class ModelConfig:
    model: str
    dtype: str = "auto"
