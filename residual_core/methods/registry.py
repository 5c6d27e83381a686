"""Method registry: a name in a config turns into a method instance."""

from __future__ import annotations

from collections.abc import Callable

from residual_core.methods.base import AnomalyMethod, MethodError

_BUILDERS: dict[str, Callable[..., AnomalyMethod]] = {}
_PREPROCESS: dict[str, Callable[[dict], str]] = {}
_SEEDED: dict[str, Callable[[dict, int], dict]] = {}
_SCORING_ONLY: dict[str, tuple[str, ...]] = {}


def register_method(name: str, *, preprocess: Callable[[dict], str],
                    seeded: Callable[[dict, int], dict] | None = None, scoring_only: tuple[str, ...] = ()):
    """Decorator: register a builder `f(backbone, **config) -> AnomalyMethod` under `name`.

    `preprocess(config) -> str` names the `residual_core.preprocess` preset the method declares with
    those keyword hyper-parameters (its config's `preprocess` field), without building anything.
    `seeded(config, run_seed) -> config` (trainable methods with a seed of their own) gives the
    hyper-parameters of the training for `run_seed`. `scoring_only` names hyper-parameters that change
    how a trained model scores but not what training produces (one training serves them all)."""

    def wrap(builder):
        _BUILDERS[name] = builder
        _PREPROCESS[name] = preprocess
        if seeded is not None:
            _SEEDED[name] = seeded
        _SCORING_ONLY[name] = tuple(scoring_only)
        return builder

    return wrap


# Built-in method name -> the module of `residual_core.methods` whose import registers it. Only the
# method a run asks for is imported: a baseline or Res2CLIP run never imports ResAD++'s flows (FrEIA, which
# imports scipy.stats: ~0.9 s of every scoring actor's start, RESULTS.md thirteenth pass).
BUILTIN_METHOD_MODULES = {"baseline": "baseline", "res2clip": "res2clip", "resadpp": "resadpp",
                          "patchcore": "patchcore"}


def _load_builtin_methods(name: str | None = None) -> None:
    """Import the built-in method `name` (its decorators register it); all of them when `name` is None or
    not a built-in (a listing, or an error message naming what is available)."""
    import importlib

    builtin = name in BUILTIN_METHOD_MODULES
    modules = [BUILTIN_METHOD_MODULES[name]] if builtin else BUILTIN_METHOD_MODULES.values()
    for module in modules:
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
    _load_builtin_methods(name)
    if name not in _PREPROCESS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(_BUILDERS))}")
    return _PREPROCESS[name](dict(params or {}))


def seeded_params(name: str, params: dict, run_seed: int) -> dict:
    """The keyword hyper-parameters of method `name` trained for `run_seed`: a method's own seed
    (initialisation, shuffling) becomes its default + `run_seed` unless `params` fix it, so seed 0 keeps
    the authors' seed and seeds 0, 1, 2 are three trainings. Methods without a seed: `params` as given."""
    _load_builtin_methods(name)
    hook = _SEEDED.get(name)
    return hook(dict(params), int(run_seed)) if hook is not None and run_seed else dict(params)


def training_params(name: str, params: dict) -> dict:
    """`params` without the method's scoring-only hyper-parameters: what identifies its training."""
    _load_builtin_methods(name)
    return {k: v for k, v in params.items() if k not in _SCORING_ONLY.get(name, ())}


def create_method(name: str, backbone, **config) -> AnomalyMethod:
    """Build the method `name` on `backbone` with keyword hyper-parameters."""
    _load_builtin_methods(name)
    if name not in _BUILDERS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](backbone, **config)
