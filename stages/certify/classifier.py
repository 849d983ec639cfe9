"""The base classifier a certification runs: PyTorch (channels_last, optional autocast) or ONNX
Runtime on the CPU when the export agrees with PyTorch on noisy probes; the checks that a model fits
before hours of certifying; and the weight digests that say which classifier a table certified."""

from __future__ import annotations

import torch

from deploypipe.data import ImageSet
from deploypipe.errors import InputError
from deploypipe.noise import noisy_images
from deploypipe.progress import log
from deploypipe.smoothing import CPU_FORWARD_BATCH, split

from .config import CertifyConfig
from .runtime import OnnxClassifier, to_onnxruntime


class Autocast(torch.nn.Module):
    """The base classifier under autocast; the noisy input arrives in float32, logits leave in float32."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device_type = model, torch.device(device).type
        self.dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        self.agreement = float("nan")  # top-1 agreement with float32 on noisy probes, set by _classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x).float()


def prepare(model: torch.nn.Module, cfg: CertifyConfig, device) -> torch.nn.Module:
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Autocast(model, device) if cfg.autocast else model


def base_classifier(model: torch.nn.Module, cfg: CertifyConfig, device: torch.device, shape: tuple[int, ...],
                    probe: torch.Tensor, num_classes: int, what: str, prefix: str):
    """The base classifier as it will run: ONNX Runtime (runtime auto on the CPU, or onnxruntime) when
    the export agrees with PyTorch on ``probe``, else PyTorch (channels_last, autocast). ``prefix``
    starts the log lines (the stage id)."""
    if cfg.runtime == "onnxruntime" and device.type != "cpu":
        raise InputError(f"certify runtime onnxruntime runs on the CPU, the device is {device}",
                         "use --runtime torch (or auto) on a GPU, or --device cpu")
    if cfg.runtime == "onnxruntime" or (cfg.runtime == "auto" and device.type == "cpu" and not cfg.autocast):
        import copy

        session, why = to_onnxruntime(copy.deepcopy(model), shape, probe)
        log(f"[{prefix}] {what}: {why}" + ("" if session else "; certifying in PyTorch"))
        if session is not None:
            return session
        if cfg.runtime == "onnxruntime":
            raise InputError(f"certify runtime onnxruntime: {why}", "use --runtime torch (or auto)")
    prepared = prepare(model, cfg, device)
    if isinstance(prepared, Autocast):  # the certificate is for the reduced-precision classifier: say how close it is
        check_outputs(model, probe[:2].to(device), num_classes, what)  # a misfit model: exit 2, first
        with torch.inference_mode():
            x = probe.to(device)
            want = torch.cat([model(c) for c in x.split(CPU_FORWARD_BATCH)]).argmax(1)  # float32, same module
            got = torch.cat([prepared(c) for c in x.split(CPU_FORWARD_BATCH)]).argmax(1)
        prepared.agreement = float((got == want).float().mean())
        log(f"[{prefix}] {what}: under autocast ({prepared.dtype}) the top-1 agrees with float32 on "
            f"{100 * prepared.agreement:.2f}% of {x.shape[0]} noisy probes; the certificate is for the "
            f"{prepared.dtype} classifier")
    return prepared


def probe_images(test: ImageSet, sigma: float, seed: int) -> torch.Tensor:
    """Noisy copies of the first test images (32 each of up to 8): the ONNX Runtime parity check, the
    autocast agreement and the output-shape checks run on them."""
    x = test.as_float(test.images[:8]).repeat_interleave(32, 0)
    return noisy_images(x, sigma, seed, "certify-probe", range(len(x)))  # not any certificate's noise


def probe_halves(probe: torch.Tensor) -> torch.Tensor:
    """Both DRS halves of the probe images, stacked (for one model serving both sides)."""
    return torch.cat(split(probe))


def check_outputs(classifier, inputs: torch.Tensor, num_classes: int, what: str) -> None:
    """The base classifier must return one logit per class: a wider output would put votes in the
    wrong counts (smoothing.vote_counts also refuses it, mid-run; this says so before any work)."""
    with torch.inference_mode():
        try:
            out = classifier(inputs)
        except Exception as err:  # wrong input shape or channels: the model was made for other data
            raise InputError(f"certify {what} does not run on inputs of shape {tuple(inputs.shape[1:])} "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:100]})",
                             "give a model trained on this dataset (for DRS: on its half-images)") from None
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise InputError(f"certify {what} returns outputs of shape {tuple(out.shape[1:])}, the data has "
                         f"{num_classes} classes", "give a classifier trained on this dataset's classes")


def weights_hash(model) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, bytes), or of an ONNX
    file's bytes: which classifier a shard certified (certify-merge compares them)."""
    import hashlib

    if isinstance(model, OnnxClassifier):
        return model.digest
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_saved(path: str, what: str):
    from deploypipe.models import is_model_dir, load_model

    if not is_model_dir(path):
        raise InputError(f"certify {what} '{path}' is not a saved model folder (no model.json)",
                         "give the model/ folder a stage wrote")
    return load_model(path)
