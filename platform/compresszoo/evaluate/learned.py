"""The learned models under evaluation: [FAMILY=]REF arguments, loaded from a .safetensors
checkpoint or the MLflow registry, and named as points on their family's RD curve."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import UsageError


@dataclass
class LoadedModel:
    ref: str
    family: str
    model: object
    source: str  # "checkpoint" or "registry"
    spec: dict
    weights_id: str
    setting: str = ""  # the point's name on its curve, set once all models are loaded

    def describe(self) -> dict:
        return {"ref": self.ref, "source": self.source, "family": self.family, "setting": self.setting,
                "spec": self.spec, "weights_id": self.weights_id}


def parse_model_arg(value: str) -> tuple[str, str, bool]:
    """[FAMILY=]REF -> (family or "", ref, whether ref is a checkpoint file rather than a registry name)."""
    family, sep, ref = value.partition("=")
    if not sep or Path(value).exists():  # a file whose name holds "=" is still a file
        family, ref = "", value
    path = Path(ref)
    return family, ref, path.suffix == ".safetensors" or path.exists()


def load_model(value: str, tracking_uri: str | None) -> LoadedModel:
    """[FAMILY=]REF, REF a .safetensors path or a registry NAME[@ALIAS|:VERSION] (read from the
    registry at `tracking_uri`, which a registry reference needs)."""
    family, ref, is_file = parse_model_arg(value)
    if is_file:
        from compresszoo.models.io import load_weights

        model, source = load_weights(Path(ref)), "checkpoint"
    else:
        model, source = _load_registered(ref, tracking_uri), "registry"
    from compresszoo.models import spec_of
    from compresszoo.models.io import weights_id

    spec = spec_of(model)
    model.eval()
    model.update()  # builds the CDF tables if the checkpoint lacks them; no-op otherwise
    return LoadedModel(ref, family or f"{spec.architecture}-{spec.metric}", model, source,
                       spec.to_dict(), weights_id(model))


def _load_registered(ref: str, tracking_uri: str | None):
    if not tracking_uri:
        raise UsageError(f"--model {ref!r} is not a file, so it is read as a registry reference, which "
                         "needs the MLflow server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    try:
        from compresszoo.registry_client import load_registered
    except ImportError as e:
        raise UsageError(
            f"--model {ref!r} is not a file, and loading registered models needs "
            f"compresszoo.registry_client.load_registered, which this installation lacks ({e}); "
            "give a .safetensors checkpoint path instead") from None
    return load_registered(ref, tracking_uri=tracking_uri)


def load_models(values: list[str], tracking_uri: str | None) -> list[LoadedModel]:
    """Every --model, named on its curve; a model that cannot be loaded is a UsageError naming it."""
    models = []
    for value in values:
        try:
            models.append(load_model(value, tracking_uri))
        except UsageError:
            raise
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: the registry's errors too
            raise UsageError(f"--model {value}: {e}") from None
    name_settings(models)
    return models


def name_settings(models: list[LoadedModel]) -> None:
    """q<quality> on its family's curve; the reference is added where two models share one."""
    for m in models:
        m.setting = f"q{m.spec['quality']}"
    for m in models:
        if sum(o.family == m.family and o.setting.split()[0] == m.setting for o in models) > 1:
            m.setting = f"{m.setting} [{m.ref}]"
