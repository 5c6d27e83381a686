"""Method registry: a name in a config turns into a method instance."""

from __future__ import annotations

from collections.abc import Callable

from residual_core.methods.base import AnomalyMethod, MethodError

_BUILDERS: dict[str, Callable[..., AnomalyMethod]] = {}
_PREPROCESS: dict[str, Callable[[dict], str]] = {}


def register_method(name: str, *, preprocess: Callable[[dict], str]):
    """Decorator: register a builder `f(backbone, **config) -> AnomalyMethod` under `name`.

    `preprocess(config) -> str` names the `residual_core.preprocess` preset the method declares with
    those keyword hyper-parameters (its config's `preprocess` field), without building anything."""

    def wrap(builder):
        _BUILDERS[name] = builder
        _PREPROCESS[name] = preprocess
        return builder

    return wrap


def _load_builtin_methods() -> None:
    # importing the modules runs their @register_method decorators
    import importlib

    for module in ("baseline", "res2clip", "resadpp", "patchcore"):
        try:
            importlib.import_module(f"residual_core.methods.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"residual_core.methods.{module}":
                raise


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_BUILDERS)


def method_preprocess(name: str, params: dict | None = None) -> str:
    """The preprocessing preset of method `name` with keyword hyper-parameters `params`: the one
    place pipelines ask which `residual_core.preprocess` preset turns images and masks into its input.
    Invalid params raise MethodError here, as `create_method` would."""
    _load_builtin_methods()
    if name not in _PREPROCESS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(_BUILDERS))}")
    return _PREPROCESS[name](dict(params or {}))


def create_method(name: str, backbone, **config) -> AnomalyMethod:
    """Build the method `name` on `backbone` with keyword hyper-parameters."""
    _load_builtin_methods()
    if name not in _BUILDERS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](backbone, **config)
