from abc import ABC, abstractmethod


class RecordingModel:
    """Stands for a vLLM model: `load_weights` takes (name, tensor) pairs."""

    def __init__(self):
        self.weights = {}

    def load_weights(self, weights):
        for name, tensor in weights:
            self.weights[name] = tensor
        return set(self.weights)

    def eval(self):
        return self


class BaseModelLoader(ABC):
    def __init__(self, load_config):
        self.load_config = load_config

    @abstractmethod
    def download_model(self, model_config) -> None:
        raise NotImplementedError

    @abstractmethod
    def load_weights(self, model, model_config) -> None:
        raise NotImplementedError

    def load_model(self, vllm_config, model_config, prefix: str = ""):
        model = RecordingModel()
        self.load_weights(model, model_config)
        return model.eval()
