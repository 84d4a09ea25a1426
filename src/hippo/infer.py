"""The self-describing model file and the :class:`InferenceAgent` that runs it.

Torch only — never Lightning or Hydra — so a deploy server starts fast and loads a model with
``InferenceAgent.from_file(path)``; on a CPU the networks run through ONNX Runtime where it is
installed (``backend="auto"``, :mod:`hippo.model.onnx_runtime`).

Model file (``torch.save`` of a plain dict, loaded with ``weights_only=True``)::

    format         "hippo-model/1"
    hippo_version  package version that wrote it
    created        ISO-8601 UTC time
    net            {"class": "hippo.model.unet.UNet", "config": {UNet keyword arguments}}
    state_dict     the network weights
    preprocessing  {"normalization": "minmax_per_volume" | "percentile_per_volume", "slice_axis": int,
                    "patch_size": [H, W],
                    "context_slices": int (neighbours per side as channels, 2.5D; absent = 0)}
    postprocessing {"largest_component": bool} (absent = none)
    labels         {"0": "background", "1": "anterior", "2": "posterior"}
    metrics        test metrics of the training run (may be empty)
    training       a summary of how it was trained (data, split sizes, epochs, precision...)

An **ensemble** file (:func:`save_ensemble_file`, e.g. the five cross-validation fold models)
holds ``members`` — a list of ``{"net", "state_dict", "preprocessing"[, "weight_scales"]}`` —
instead of the top-level ``net``, ``state_dict`` and ``preprocessing``. Its weights may be stored
as float16 (half the size) or, for the convolution kernels, as int8 with one float32 scale per
output channel in ``weight_scales`` (a quarter; biases and norms stay float16); they always run
in float32. The agent averages the members' softmax probabilities in
the volume's own voxel order (so members may slice along different axes), then takes the argmax
and applies the post-processing.
"""

from __future__ import annotations

import copy
import datetime as _dt
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from hippo import __version__
from hippo.fileio import to_plain, write_bytes_atomic
from hippo.inference_settings import BACKENDS, PRECISIONS, InferenceSettings  # noqa: F401 - re-exported
from hippo.model.slicewise import keep_largest_component, segment_slices
from hippo.model.unet import UNet
from hippo.preprocessing import LABEL_NAMES, NORMALIZATIONS, normalize

MODEL_FORMAT = "hippo-model/1"
WEIGHT_FORMATS = ("float32", "float16", "int8")


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """The precision the networks actually run in: ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` takes bfloat16 autocast only where the hardware runs it natively (a CUDA device that
    supports bfloat16; a CPU whose oneDNN has bfloat16 kernels: AVX-512 BF16 or AMX), else float32.
    On a CPU without them bfloat16 is emulated: a convolution measured 40x slower than float32 on an
    AVX2-only 2-core machine, while with them it is about 2x faster. Volumes differ by at most 0.2 %
    between the two on the real scans (``docs/wholehead.md``).

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if dev.type == "cpu":
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without oneDNN
            native = False
        return "bfloat16" if native else "float32"
    return "float32"


def resolve_backend(backend: str, device: str | torch.device = "cpu", precision: str = "float32") -> str:
    """What runs the networks: ``"torch"`` or ``"onnxruntime"``.

    ``"auto"`` takes ONNX Runtime (:mod:`hippo.model.onnx_runtime`) on a CPU in float32 when
    ``onnxruntime`` is installed: the same network about 1.5x faster on an AVX2 CPU, logits within
    1e-4 of torch's; torch elsewhere (CUDA, bfloat16 autocast). ``precision`` is the resolved one.

    Raises:
        ValueError: an unknown backend, or ``"onnxruntime"`` where it cannot run (not a CPU device,
            bfloat16, or not installed).
    """
    from hippo.model import onnx_runtime

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    possible = torch.device(device).type == "cpu" and precision == "float32" and onnx_runtime.available()
    if backend == "auto":
        return "onnxruntime" if possible else "torch"
    if backend == "onnxruntime" and not possible:
        raise ValueError(f"backend=onnxruntime runs float32 on a CPU with the onnxruntime package installed "
                         f"(device {device}, precision {precision}, onnxruntime "
                         f"{'installed' if onnx_runtime.available() else 'not installed'})")
    return backend


_NETS = {"hippo.model.unet.UNet": UNet}


def save_model_file(
    path: str | os.PathLike,
    net: UNet,
    *,
    preprocessing: Mapping[str, Any],
    labels: Mapping[int, str] = LABEL_NAMES,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    postprocessing: Mapping[str, Any] | None = None,
) -> Path:
    """Write the model file atomically (temporary name, then rename). Returns its path."""
    body = {"net": _net_entry(net), **_stored_weights(net, "float32"),
            "preprocessing": to_plain(preprocessing)}
    return write_model_payload(path, _model_payload(body, labels=labels, metrics=metrics, training=training,
                                                    postprocessing=postprocessing))


def save_ensemble_file(path: str | os.PathLike, members: Sequence[tuple[UNet, Mapping[str, Any]]],
                       **fields: Any) -> Path:
    """Write an ensemble model file atomically: ``members`` are ``(net, preprocessing)`` pairs;
    ``fields`` are :func:`ensemble_payload`'s keywords (``labels``, ``metrics``, ``training``,
    ``postprocessing``, ``weight_format``). Returns its path."""
    return write_model_payload(path, ensemble_payload(members, **fields))


def ensemble_payload(
    members: Sequence[tuple[UNet, Mapping[str, Any]]],
    *,
    labels: Mapping[int, str] = LABEL_NAMES,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    postprocessing: Mapping[str, Any] | None = None,
    weight_format: str = "float16",
) -> dict[str, Any]:
    """The in-memory model file of an ensemble (what :func:`save_ensemble_file` writes), so that a
    caller can evaluate the stored weights (:meth:`InferenceAgent.from_payload`) and add their
    ``metrics`` before writing it once with :func:`write_model_payload`.

    ``weight_format``: how the weights are stored (the agent runs them in float32): ``"float32"``,
    ``"float16"`` (half the size) or ``"int8"`` (convolution kernels as int8 with a float32 scale
    per output channel, the rest float16: about a quarter).
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    body = {"members": [{"net": _net_entry(net), **_stored_weights(net, weight_format),
                         "preprocessing": to_plain(pre)} for net, pre in members]}
    return _model_payload(body, labels=labels, metrics=metrics, training=training, postprocessing=postprocessing)


def _net_entry(net: UNet) -> dict[str, Any]:
    return {"class": "hippo.model.unet.UNet", "config": dict(net.config)}


def _stored_weights(net: UNet, weight_format: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"state_dict": ...}`` in ``weight_format``, plus ``"weight_scales"`` for int8 kernels."""
    state, scales = {}, {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        if not v.is_floating_point() or weight_format == "float32":
            state[k] = v.clone()
        elif weight_format == "int8" and v.ndim >= 2:
            # symmetric, per output channel: w ~ q * scale with q in [-127, 127]
            scale = v.abs().amax(dim=tuple(range(1, v.ndim))).float().clamp_min(1e-12) / 127.0
            state[k] = torch.round(v / scale.view(-1, *[1] * (v.ndim - 1))).clamp(-127, 127).to(torch.int8)
            scales[k] = scale
        else:
            state[k] = v.half()
    return {"state_dict": state, **({"weight_scales": scales} if scales else {})}


def _model_payload(body: Mapping[str, Any], *, labels: Mapping[int, str], metrics: Mapping[str, Any] | None,
                   training: Mapping[str, Any] | None, postprocessing: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields every model file has around ``body`` (the network(s))."""
    return {
        "format": MODEL_FORMAT,
        "hippo_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **body,
        "postprocessing": to_plain(postprocessing or {}),
        "labels": {str(k): str(v) for k, v in labels.items()},
        "metrics": to_plain(metrics or {}),
        "training": to_plain(training or {}),
    }


def write_model_payload(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Save a model file's payload atomically (temporary name, then rename). Returns its path."""
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def load_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a model file (weights-only unpickling: no code runs from the file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a hippo model file, or one of an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable hippo model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: expected model format {MODEL_FORMAT!r}, found {found!r} "
                         "(a Lightning .ckpt is not a model file: use the exported model.pt)")
    single = all(k in payload for k in ("net", "state_dict", "preprocessing"))
    members = payload.get("members")
    if not single and not (isinstance(members, list) and members):
        raise ValueError(f"{path}: a model file needs net/state_dict/preprocessing or a non-empty members list")
    return payload


def build_net(payload: Mapping[str, Any]) -> UNet:
    """Rebuild the network of a loaded model file (or of one ensemble member) and load its
    weights in float32 (eval mode)."""
    cls = _NETS.get(payload["net"]["class"])
    if cls is None:
        raise ValueError(f"unknown network class {payload['net']['class']!r}")
    net = cls(**payload["net"]["config"])
    scales = payload.get("weight_scales") or {}
    state = {}
    for k, v in payload["state_dict"].items():
        if k in scales:
            v = v.float() * scales[k].float().view(-1, *[1] * (v.ndim - 1))
        state[k] = v.float() if v.is_floating_point() else v
    net.load_state_dict(state)
    return net.eval()


def build_members(payload: Mapping[str, Any]) -> list[tuple[UNet, dict[str, Any]]]:
    """``(net, preprocessing)`` of every member of a loaded model file (one for a single model)."""
    if "members" in payload:
        return [(build_net(m), dict(m["preprocessing"])) for m in payload["members"]]
    return [(build_net(payload), dict(payload["preprocessing"]))]


@dataclass(frozen=True)
class MemberSegmentation:
    """One volume segmented by every member of a model (:meth:`InferenceAgent.segment_members`).

    Attributes:
        labels: ``(X, Y, Z) uint8`` final labels (0 background, 1 anterior, 2 posterior), after the
            model's post-processing: what :meth:`InferenceAgent.segment` returns.
        probabilities: ``(C, X, Y, Z) float32`` class probabilities averaged over the members.
        member_probabilities: one ``(C, X, Y, Z) float32`` array per member (a single-network model
            has one, equal to ``probabilities``).
        unprocessed_labels: ``(X, Y, Z) uint8`` argmax of ``probabilities`` before post-processing
            (what the largest-component step removed is the difference).
    """

    labels: np.ndarray
    probabilities: np.ndarray
    member_probabilities: tuple[np.ndarray, ...]
    unprocessed_labels: np.ndarray


class InferenceAgent:
    """Runs a trained network on whole volumes of any shape.

    Args:
        net: the network (put in eval mode and moved to ``device``).
        preprocessing: the model file's preprocessing block.
        labels: label value -> name.
        device: ``"cpu"``, ``"cuda"``...
        batch_size: slices per forward pass.
        metadata: the rest of the model file (version, metrics, training summary).
        postprocessing: the model file's postprocessing block (``largest_component``).
        more_members: further ``(net, preprocessing)`` pairs: an ensemble whose softmax
            probabilities are averaged (``net``/``preprocessing`` are the first member).
        member_threads: run up to this many ensemble members at once, each on one intra-op
            thread (None: one per CPU core; 1, the default: one after another with torch's
            intra-op threads). On the 2-core development machine side by side measured 0.97x to
            1.18x across runs of ``benchmarks/bench_model.py``, so the simpler one is the default.
        precision: ``"float32"`` (the default), ``"bfloat16"`` or ``"auto"`` (bfloat16 where the hardware
            runs it natively: :func:`resolve_precision`; ``self.precision`` holds what runs): the networks
            run under bfloat16 autocast (softmax and averaging stay float32). On the 2-core CPU the shipped model
            segments 1.7x faster with it and its test Dice is unchanged to 4 decimals.
        backend: ``"auto"`` (the default), ``"torch"`` or ``"onnxruntime"``: what runs the networks
            (:func:`resolve_backend`; ``self.backend`` holds what runs). ONNX Runtime sessions run their
            members one after another, each on torch's intra-op thread count (``member_threads`` is for torch).
    """

    def __init__(
        self,
        net: UNet,
        preprocessing: Mapping[str, Any],
        labels: Mapping[int, str] = LABEL_NAMES,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        metadata: Mapping[str, Any] | None = None,
        postprocessing: Mapping[str, Any] | None = None,
        more_members: Sequence[tuple[UNet, Mapping[str, Any]]] = (),
        member_threads: int | None = 1,
        precision: str = "float32",
        backend: str = "auto",
    ):
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)  # "auto" resolved: what really runs
        self.backend = resolve_backend(backend, self.device, self.precision)
        self.members: list[tuple[UNet, dict[str, Any]]] = []
        for member_net, pre in [(net, preprocessing), *more_members]:
            pre = dict(pre)
            if pre.get("normalization", "minmax_per_volume") not in NORMALIZATIONS:
                raise ValueError(f"unsupported normalization {pre.get('normalization')!r}")
            expected = 2 * int(pre.get("context_slices", 0)) + 1
            in_channels = getattr(member_net, "config", {}).get("in_channels", expected)
            if in_channels != expected:
                raise ValueError(f"the network takes {in_channels} input channels but context_slices="
                                 f"{pre.get('context_slices', 0)} gives {expected}")
            self.members.append((member_net.to(self.device).eval(), pre))
        self.net, self.preprocessing = self.members[0]
        self.labels = {int(k): v for k, v in labels.items()}
        self.batch_size = batch_size
        self.metadata = dict(metadata or {})
        self.postprocessing = dict(postprocessing or {})
        if member_threads is None:
            member_threads = min(len(self.members), os.cpu_count() or 1) if self.device.type == "cpu" else 1
        self.member_threads = max(1, int(member_threads))
        #: ONNX Runtime sessions by (network, intra-op threads): shared with :meth:`subset` and
        #: :meth:`for_concurrent_calls` agents, so none is built twice
        self._sessions: dict[tuple[int, int], Any] = {}
        #: what each member runs on: its network (torch) or an ONNX Runtime session of it
        self._runners: list[Any] = [self._runner(m) for m, _ in self.members]

    def _runner(self, net: UNet, threads: int | None = None) -> Any:
        """``net`` itself (torch) or its ONNX Runtime session on ``threads`` intra-op threads (None:
        torch's current thread count), built once per network and thread count."""
        if self.backend != "onnxruntime":
            return net
        from hippo.model.onnx_runtime import OnnxUNet

        threads = int(threads or torch.get_num_threads() or 1)
        key = (id(net), threads)
        if key not in self._sessions:
            self._sessions[key] = OnnxUNet(net, threads=threads)
        return self._sessions[key]

    def for_concurrent_calls(self, callers: int) -> "InferenceAgent | None":
        """An agent of the same members for ``callers`` threads that call it at once (e.g. both
        hippocampi of a head side by side), each call running on its share of the cores:
        ONNX Runtime sessions of ``threads // callers`` intra-op threads (``threads``: torch's
        thread count, which the caller sized to the machine), built once and shared with this
        agent's subsets. The results are the same as this agent's.

        On the 2-core machine both sides of a head on one-thread sessions took 3.2 s against 3.5 s
        one after the other on two-thread sessions, and 8.7 s against 9.7 s for two heads while the
        next scan registered beside them (one thread per call has no barrier to wait at when the
        cores are shared).

        Returns:
            The agent, or ``None`` where calls cannot get threads of their own (the torch backend:
            its intra-op thread count is process-wide) or nothing is gained (``callers < 2``, or
            fewer threads than callers).
        """
        callers = int(callers)
        threads = int(torch.get_num_threads() or 1)
        if self.backend != "onnxruntime" or callers < 2 or threads < callers:
            return None
        new = copy.copy(self)
        new._runners = [self._runner(net, threads // callers) for net, _ in self.members]
        return new

    def subset(self, indices: Sequence[int]) -> "InferenceAgent":
        """An agent of some of this one's members (by index, in that order) with the same settings,
        sharing their networks and ONNX Runtime sessions (none is built again)."""
        chosen = [int(i) for i in indices]
        if not chosen:
            raise ValueError("a subset needs at least one member")
        new = copy.copy(self)
        new.members = [self.members[i] for i in chosen]
        new._runners = [self._runners[i] for i in chosen]
        new.net, new.preprocessing = new.members[0]
        return new

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str = "cpu", batch_size: int = 64,
                  member_threads: int | None = 1, precision: str = "float32",
                  backend: str = "auto") -> "InferenceAgent":
        """Load an exported model file (see the module docstring)."""
        return cls.from_payload(load_model_file(path), path=path, device=device, batch_size=batch_size,
                                member_threads=member_threads, precision=precision, backend=backend)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], *, path: str | os.PathLike | None = None, device: str = "cpu",
                     batch_size: int = 64, member_threads: int | None = 1,
                     precision: str = "float32", backend: str = "auto") -> "InferenceAgent":
        """An agent for a model file's payload already in memory (a loaded file, or one about to be
        written: :func:`ensemble_payload`), with its weights as stored (int8/float16 included)."""
        members = build_members(payload)
        meta = {k: v for k, v in payload.items() if k not in ("state_dict", "members")}
        meta["path"] = str(path) if path is not None else None
        meta["n_members"] = len(members)
        meta.setdefault("preprocessing", members[0][1])
        return cls(*members[0], payload["labels"], device=device, batch_size=batch_size, metadata=meta,
                   postprocessing=payload.get("postprocessing"), more_members=members[1:],
                   member_threads=member_threads, precision=precision, backend=backend)

    @property
    def slice_axis(self) -> int:
        return int(self.preprocessing.get("slice_axis", 0))

    @property
    def context_slices(self) -> int:
        return int(self.preprocessing.get("context_slices", 0))

    def segment(self, volume: np.ndarray, return_probabilities: bool = False):
        """Segment one raw volume.

        Args:
            volume: ``(X, Y, Z)`` raw intensities in the voxel order the model was trained on
                (the NIfTI's stored order; any shape, any numeric dtype, finite values).
            return_probabilities: also return ``(C, X, Y, Z) float32`` class probabilities.

        Returns:
            ``(X, Y, Z) uint8`` labels (0 background, 1 anterior, 2 posterior)
            [, probabilities].
        """
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
        if not np.isfinite(volume).all():
            raise ValueError("volume holds NaN or infinite values")
        largest = bool(self.postprocessing.get("largest_component", False))
        if len(self.members) == 1:
            labels, probs = self._segment_member(self._runners[0], self.preprocessing, volume, return_probabilities,
                                                 largest_component=largest)
            return (labels, probs) if return_probabilities else labels
        probs = np.sum(self._member_probabilities(volume), axis=0) / len(self.members)
        labels = probs.argmax(0).astype(np.uint8)
        if largest:
            labels = keep_largest_component(labels)
        return (labels, probs) if return_probabilities else labels

    def segment_members(self, volume: np.ndarray) -> "MemberSegmentation":
        """Segment one raw volume and keep what each ensemble member said (one inference pass: the
        same work as :meth:`segment`, whose labels and probabilities it returns too).

        Args:
            volume: ``(X, Y, Z)`` raw intensities, as for :meth:`segment`.

        Returns:
            A :class:`MemberSegmentation`: the final labels, the averaged probabilities, and each
            member's ``(C, X, Y, Z)`` probabilities (one member for a single-network model file).
        """
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
        if not np.isfinite(volume).all():
            raise ValueError("volume holds NaN or infinite values")
        parts = self._member_probabilities(volume)
        probs = parts[0] if len(parts) == 1 else np.sum(parts, axis=0) / len(parts)
        raw = probs.argmax(0).astype(np.uint8)
        labels = keep_largest_component(raw) if self.postprocessing.get("largest_component", False) else raw
        return MemberSegmentation(labels=labels, probabilities=probs.astype(np.float32, copy=False),
                                  member_probabilities=tuple(parts), unprocessed_labels=raw)

    def _member_probabilities(self, volume: np.ndarray) -> list[np.ndarray]:
        """Every member's ``(C, X, Y, Z) float32`` softmax probabilities of one checked raw volume."""
        def member_probs(member: tuple[Any, dict[str, Any]]) -> np.ndarray:
            return self._segment_member(member[0], member[1], volume, True, largest_component=False)[1]

        runs = [(runner, pre) for runner, (_, pre) in zip(self._runners, self.members)]
        if self.member_threads > 1 and torch.get_num_threads() > 1 and self.backend == "torch":
            intra = torch.get_num_threads()
            torch.set_num_threads(1)        # process-wide: members side by side, one core each
            try:
                with ThreadPoolExecutor(self.member_threads) as pool:
                    parts = list(pool.map(member_probs, runs))
            finally:
                torch.set_num_threads(intra)
        else:
            parts = [member_probs(m) for m in runs]
        return parts

    def _segment_member(self, net: Any, pre: Mapping[str, Any], volume: np.ndarray, return_probabilities: bool,
                        largest_component: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One network (a :class:`UNet` or its :class:`hippo.model.onnx_runtime.OnnxUNet`) on one raw
        volume: ``(X, Y, Z)`` labels and optionally ``(C, X, Y, Z)`` probabilities."""
        axis = int(pre.get("slice_axis", 0))
        image = np.moveaxis(normalize(volume, pre.get("normalization", "minmax_per_volume")), axis, 0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            result = segment_slices(
                net, np.ascontiguousarray(image), size_multiple=net.size_multiple,
                min_size=pre.get("patch_size", (64, 64)), batch_size=self.batch_size,
                device=self.device, return_probabilities=return_probabilities,
                context=int(pre.get("context_slices", 0)), largest_component=largest_component,
            )
        if not return_probabilities:
            return np.ascontiguousarray(np.moveaxis(result, 0, axis)), None
        labels, probs = result
        return np.ascontiguousarray(np.moveaxis(labels, 0, axis)), np.ascontiguousarray(np.moveaxis(probs, 1, axis + 1))
