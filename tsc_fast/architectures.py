"""Architectures named by a short spec (``tsc-fast purify --arch SPEC``), built with a seeded random init.

Four kinds of spec:

- ``NAME``: a model of this package (``mlp``, ``cnn``, ``preact_resnet18``), sized from the image shape;
- ``torchvision:NAME``: a torchvision classifier (``resnet18``, ``vgg16_bn``, ``vit_b_16``, ...);
- ``timm:NAME``: a timm model (optional dependency: ``pip install 'tsc-fast[timm]'``);
- ``MODULE:CALLABLE``: your own class or factory, imported with the current directory on ``sys.path``
  (the uvicorn/gunicorn app-string convention); ``CALLABLE`` may be a dotted path (``models:Zoo.small``).

Nothing is ever downloaded: torchvision gets ``weights=None`` and timm ``pretrained=False``; the weights come from
the checkpoint loaded afterwards. Every failure raises :class:`ArchitectureError` (a ValueError) whose message
names the fix, so a command line can print it without a traceback.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import operator
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .models import ARCHITECTURES, build_classifier

PACKAGE = "package"
TORCHVISION = "torchvision"
TIMM = "timm"
PYTHON = "python"
PREFIXED_SOURCES = (TORCHVISION, TIMM)
TIMM_INSTALL_HINT = "pip install 'tsc-fast[timm]'"
# timm names with these prefixes read the model's config from the Hugging Face Hub or a folder.
TIMM_REMOTE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
SPEC_FORMS = "NAME (the package's own), torchvision:NAME, timm:NAME or MODULE:CALLABLE"


class ArchitectureError(ValueError):
    """An architecture spec that cannot be built; the message says what to change."""


class MissingDependencyError(ArchitectureError, ImportError):
    """The spec needs an optional package that is not installed."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """A parsed ``--arch`` value: where the model comes from and its name there.

    ``source`` is ``"package"``, ``"torchvision"``, ``"timm"`` or ``"python"``; ``name`` is the model name, or
    ``MODULE:CALLABLE`` for ``"python"``.
    """

    source: str
    name: str

    @property
    def module(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def attribute(self) -> str:
        return self.name.split(":", 1)[1]


def parse_architecture(spec: str) -> ArchitectureSpec:
    """Split an ``--arch`` value into its source and name (imports nothing)."""
    text = spec.strip() if isinstance(spec, str) else ""
    if not text:
        raise ArchitectureError(f"empty architecture spec; expected {SPEC_FORMS}")
    if ":" not in text:
        return ArchitectureSpec(PACKAGE, text)
    prefix, name = text.split(":", 1)
    if prefix in PREFIXED_SOURCES:
        if not name:
            raise ArchitectureError(f"{text!r} names no model: write {prefix}:NAME, e.g. {prefix}:resnet18")
        return ArchitectureSpec(prefix, name)
    _check_module_and_attribute(text, prefix, name)
    return ArchitectureSpec(PYTHON, text)


def _check_module_and_attribute(text: str, module: str, attribute: str) -> None:
    if module.endswith(".py") or "/" in module or "\\" in module:
        stem = os.path.splitext(os.path.basename(module))[0] or "mymodels"
        raise ArchitectureError(
            f"{text!r}: MODULE is a Python module name, not a file path: run from the folder that holds the file "
            f"(or add it to PYTHONPATH) and write {stem}:{attribute or 'CALLABLE'}"
        )
    if not all(part.isidentifier() for part in module.split(".")):
        raise ArchitectureError(f"{text!r}: {module!r} is not a module name; expected {SPEC_FORMS}")
    if not attribute or not all(part.isidentifier() for part in attribute.split(".")):
        raise ArchitectureError(
            f"{text!r}: {attribute!r} is not an attribute name; write MODULE:CALLABLE, e.g. mymodels:make_net"
        )


def describe_architecture(spec: str) -> str:
    """A short human-readable name for reports, e.g. ``"torchvision resnet18"``."""
    parsed = parse_architecture(spec)
    if parsed.source == PACKAGE:
        return f"tsc_fast {parsed.name}"
    if parsed.source == PYTHON:
        return f"user model {parsed.name}"
    return f"{parsed.source} {parsed.name}"


def build_architecture(
    spec: str, num_classes: int | None = None, image_shape: Sequence[int] | None = None, seed: int = 0
) -> nn.Module:
    """Build the model named by ``spec`` with a random init drawn from ``seed``; never downloads weights.

    ``num_classes``: the number of outputs (required by every builder that takes it). ``image_shape``:
    ``(C, H, W)`` of the inputs; the package's models need it, torchvision/timm/your factory get the channel
    count and, where the model takes one, the image size (ViTs). The global torch RNG is left untouched.
    Raises :class:`ArchitectureError` naming the fix.
    """
    parsed = parse_architecture(spec)
    classes, shape = _checked_num_classes(num_classes), _checked_image_shape(image_shape)
    builders = {PACKAGE: _build_package, TORCHVISION: _build_torchvision, TIMM: _build_timm, PYTHON: _build_user}
    return builders[parsed.source](parsed, classes, shape, seed)


def _checked_num_classes(num_classes: int | None) -> int | None:
    if num_classes is None:
        return None
    try:
        count = operator.index(num_classes)  # ints and numpy integers, not floats or strings
    except TypeError:
        count = 0
    if isinstance(num_classes, bool) or count < 1:
        raise ArchitectureError(f"num_classes must be a positive integer, got {num_classes!r}")
    return count


def _checked_image_shape(image_shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    if image_shape is None:
        return None
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape, default=0) < 1:
        raise ArchitectureError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)}")
    return shape


def _required_num_classes(num_classes: int | None, what: str) -> int:
    if num_classes is None:
        raise ArchitectureError(
            f"{what} needs the number of classes and the data does not say it: pass --num-classes N"
        )
    return int(num_classes)


@contextlib.contextmanager
def _seeded_init(seed: int) -> Iterator[None]:
    """Draw initial weights from ``seed`` and restore the global CPU RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))  # CPU only: the CUDA generators are not forked
        yield


def _close_matches(name: str, candidates: Iterable[str], limit: int = 5) -> list[str]:
    """Up to ``limit`` candidates resembling ``name``, ignoring case."""
    by_lower = {c.lower(): c for c in candidates}
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=limit, cutoff=0.6)]


def _did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    matches = _close_matches(name, candidates)
    return f"; close matches: {', '.join(prefix + m for m in matches)}" if matches else ""


def _call_builder(label: str, builder: Callable[..., Any], kwargs: dict[str, Any], seed: int) -> Any:
    """``builder(**kwargs)`` under the seeded init; its exceptions become ArchitectureErrors naming the call."""
    try:
        with _seeded_init(seed):
            return builder(**kwargs)
    except ArchitectureError:
        raise
    except Exception as error:
        arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ArchitectureError(f"calling {label}({arguments}) raised {type(error).__name__}: {error}") from error


# --- the package's own models ------------------------------------------------------------------------------------

def _build_package(spec: ArchitectureSpec, num_classes: int | None, shape: tuple | None, seed: int) -> nn.Module:

    if spec.name not in ARCHITECTURES:
        raise ArchitectureError(
            f"unknown architecture {spec.name!r}; the package's own: {', '.join(sorted(ARCHITECTURES))}; "
            f"or torchvision:NAME, timm:NAME, MODULE:CALLABLE{_prefixed_suggestion(spec.name)}"
        )
    classes = _required_num_classes(num_classes, f"architecture {spec.name!r}")
    if shape is None:
        raise ArchitectureError(f"architecture {spec.name!r} is sized from the data: pass image_shape (C, H, W)")
    return build_classifier(spec.name, shape, classes, seed=seed)


def _prefixed_suggestion(name: str) -> str:
    """' (did you mean torchvision:resnet18?)' when a bare name is a torchvision or installed timm model."""
    lowered = name.lower()
    found = []
    with contextlib.suppress(ImportError):
        if lowered in _torchvision_classifiers():
            found.append(f"{TORCHVISION}:{lowered}")
    if importlib.util.find_spec("timm") is not None:
        with contextlib.suppress(Exception):  # a broken timm install must not hide the real error
            if _import_timm().is_model(lowered):
                found.append(f"{TIMM}:{lowered}")
    return f" (did you mean {' or '.join(found)}?)" if found else ""


# --- torchvision and timm ----------------------------------------------------------------------------------------

def _torchvision_classifiers() -> list[str]:
    import torchvision.models

    # module= keeps the classifiers: detection, segmentation, video, ... live in submodules.
    return torchvision.models.list_models(module=torchvision.models)


def _returned_class(builder: Callable[..., Any]) -> type | None:
    """The model class a builder's return annotation names (torchvision and timm annotate theirs)."""
    try:
        annotation = inspect.signature(builder, eval_str=True).return_annotation
    except Exception:  # unresolvable string annotations: no size keyword is passed
        return None
    return annotation if isinstance(annotation, type) else None


def _size_keywords(model_class: type | None, shape: tuple | None, label: str) -> dict[str, Any]:
    """The image-size argument of models built for one input size (ViTs, MaxViT), when the class takes one."""
    if model_class is None or shape is None:
        return {}
    accepted = inspect.signature(model_class.__init__).parameters
    height, width = shape[1], shape[2]
    if "image_size" in accepted:  # torchvision VisionTransformer: one int
        if height != width:
            raise ArchitectureError(f"{label} needs square images, the data has {height}x{width}")
        return {"image_size": height}
    for keyword in ("input_size", "img_size"):  # torchvision MaxVit, timm
        if keyword in accepted:
            return {keyword: (height, width)}
    return {}


def _build_torchvision(spec: ArchitectureSpec, num_classes: int | None, shape: tuple | None, seed: int) -> nn.Module:
    try:
        import torchvision.models
    except ImportError as error:
        raise MissingDependencyError(
            f"--arch {spec.source}:{spec.name} needs torchvision: pip install 'tsc-fast[vision]'"
        ) from error
    name = spec.name.lower()  # torchvision's own lookup ignores case
    label = f"torchvision:{name}"
    classifiers = _torchvision_classifiers()
    if name not in classifiers:
        if name in torchvision.models.list_models():
            raise ArchitectureError(
                f"{label} is not a classification model; TSC purifies classifiers: pick one of "
                "torchvision.models.list_models(module=torchvision.models)"
            )
        raise ArchitectureError(
            f"unknown torchvision classifier {spec.name!r}{_did_you_mean(name, classifiers, 'torchvision:')}"
        )
    if shape is not None and shape[0] != 3:
        raise ArchitectureError(
            f"torchvision classifiers take 3-channel images, the data has {shape[0]}: use timm:NAME (timm adapts "
            "the first layer to in_chans), your own MODULE:CALLABLE, or convert the images to 3 channels"
        )
    classes = _required_num_classes(num_classes, label)
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None, "num_classes": classes, **_size_keywords(_returned_class(builder), shape, label)}
    return _call_builder(label, lambda **kw: torchvision.models.get_model(name, **kw), kwargs, seed)


def _import_timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError as error:
        raise MissingDependencyError(f"timm:NAME architectures need timm, which is not installed: "
                                     f"{TIMM_INSTALL_HINT}") from error


def _build_timm(spec: ArchitectureSpec, num_classes: int | None, shape: tuple | None, seed: int) -> nn.Module:
    timm = _import_timm()
    name = spec.name
    label = f"timm:{name}"
    if name.startswith(TIMM_REMOTE_PREFIXES):
        raise ArchitectureError(
            f"{label}: timm names that read their config from the Hugging Face Hub or a folder are not supported "
            "(tsc_fast never downloads); use a registered name such as timm:resnet18"
        )
    if not timm.is_model(name):
        if timm.is_model(name.lower()):
            name, label = name.lower(), f"timm:{name.lower()}"
        else:
            raise ArchitectureError(f"unknown timm model {name!r}{_did_you_mean(name, timm.list_models(), 'timm:')}")
    classes = _required_num_classes(num_classes, label)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": classes}
    if shape is not None:
        kwargs["in_chans"] = shape[0]
        kwargs.update(_size_keywords(_returned_class(timm.models.model_entrypoint(name)), shape, label))
    return _call_builder(label, lambda **kw: timm.create_model(name, **kw), kwargs, seed)


# --- MODULE:CALLABLE ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _cwd_on_sys_path() -> Iterator[str]:
    """The current directory first on ``sys.path`` (console scripts do not put it there), removed afterwards."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield cwd
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_user_module(module_name: str, cwd: str) -> Any:
    importlib.invalidate_caches()  # the file may have been written after an earlier failed import
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            searched = "\n  ".join(p or "(current directory)" for p in sys.path)
            raise ArchitectureError(
                f"cannot import module {module_name!r}: no {missing.replace('.', '/')}.py or package "
                f"{missing.replace('.', '/')}/ in the current directory ({cwd}) or on sys.path; run from the folder "
                f"that holds it or add that folder to PYTHONPATH. Searched:\n  {searched}"
            ) from error
        raise ArchitectureError(f"importing module {module_name!r} failed: {error} (a module it imports "
                                "is not installed)") from error
    except Exception as error:  # SyntaxError, or whatever its top-level code raises
        raise ArchitectureError(f"importing module {module_name!r} raised {type(error).__name__}: {error}") \
            from error


def _resolve_attribute(module: Any, dotted: str, spec_text: str) -> Any:
    obj = module
    for depth, part in enumerate(dotted.split(".")):
        if not hasattr(obj, part):
            owner = module.__name__ + "".join("." + p for p in dotted.split(".")[:depth])
            where = getattr(module, "__file__", None) if depth == 0 else None
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ArchitectureError(
                f"{spec_text}: {owner!r}{f' ({where})' if where else ''} has no attribute {part!r}"
                + (_did_you_mean(part, public) or (f"; it defines: {', '.join(public[:10])}" if public else ""))
            )
        obj = getattr(obj, part)
    return obj


def _factory_keywords(factory: Callable[..., Any], num_classes: int | None, in_channels: int | None,
                      spec_text: str) -> dict[str, Any]:
    """``num_classes=`` if the factory takes it (by name or ``**kwargs``); ``in_channels=`` only by that name."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: call it without arguments
        return {}
    by_keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    kwargs: dict[str, Any] = {}
    if "num_classes" in by_keyword or takes_any_keyword:
        kwargs["num_classes"] = _required_num_classes(num_classes, spec_text)
    # An explicit name only: passing in_channels into **kwargs could reach a layer that means something else.
    if "in_channels" in by_keyword and in_channels is not None:
        kwargs["in_channels"] = in_channels
    return kwargs


def _build_user(spec: ArchitectureSpec, num_classes: int | None, shape: tuple | None, seed: int) -> nn.Module:
    with _cwd_on_sys_path() as cwd:  # kept during the call too: a factory may import sibling modules lazily
        with torch.random.fork_rng(devices=[]):  # the module's top level may draw random numbers (a model built there)
            module = _import_user_module(spec.module, cwd)
        factory = _resolve_attribute(module, spec.attribute, spec.name)
        if isinstance(factory, nn.Module):
            raise ArchitectureError(
                f"{spec.name} is a model instance; --arch needs a class or a function that builds a new model"
            )
        if not callable(factory):
            raise ArchitectureError(
                f"{spec.name} is a {type(factory).__name__}, not a class or a function that builds a model"
            )
        kwargs = _factory_keywords(factory, num_classes, None if shape is None else shape[0], spec.name)
        model = _call_builder(spec.name, factory, kwargs, seed)
    if not isinstance(model, nn.Module):
        arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ArchitectureError(
            f"{spec.name}({arguments}) returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model
