"""Run options without torch: declarations, validation and the sampler manifest.

Everything `gensample run` can check before a heavy import lives here, so that a usage error
(``--steps 0``, ``--sampler nope``, a missing ``--config`` file, an ``--output`` that is a file)
and every ``--help`` answer in well under a second. Nothing in this module imports torch,
diffusers or numpy.

Two sources of sampler specs feed :func:`resolve_options`:

* the full registry (``gensample.samplers.registry``): imports every sampler, hence torch; the
  default, used by :func:`gensample.api.run`;
* the *manifest*: the registry's names, descriptions, demo models, default steps and option
  declarations as JSON (``options_manifest.json`` beside this file). It stores the SHA-256 of the
  source files the registry was built from; when any of them changed, the shipped manifest is not
  used (never a stale answer): :func:`manifest` rebuilds it from the registry once and keeps the
  copy in the user cache folder. ``python -m gensample.options --write`` refreshes the shipped
  file; a test asserts it is current.

Checks that need code (an option's ``check`` callable, a sampler's group size or ``implied``
hook) run only with the full registry, i.e. again in :func:`gensample.api.run`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

COMMON_KEYS = (
    "sampler", "model", "steps", "num_samples", "batch_size", "class_label", "guidance_scale",
    "seed", "device", "dtype", "output", "overwrite", "progress", "compile", "max_samples", "threads",
    # text-to-image / latent models (gensample.models.text, docs/text_to_image.md); None = unset
    "prompt", "negative_prompt", "guidance_rescale", "height", "width", "weights_variant",
    # flow-matching pipelines with a T5 encoder (SD3 / Flux; docs/flow_matching.md); None = the family's default
    "max_sequence_length",
)
MAX_SEQUENCE_LENGTH = 512  # the longest T5 prompt SD3 / Flux pipelines accept
# keys that may differ between an interrupted run and its resumption without changing samples
NON_SEMANTIC = ("output", "overwrite", "progress", "batch_size", "device", "num_processes", "compile", "max_samples",
                "threads")
MAX_SAMPLES = 1_000_000  # larger -n needs an explicit max_samples (--max-samples N)
DTYPE_NAMES = ("fp32", "fp16", "bf16")

TRUE_WORDS = ("1", "true", "t", "yes", "y", "on")  # click.BOOL's words
FALSE_WORDS = ("0", "false", "f", "no", "n", "off")


def _numpy_kinds() -> tuple[tuple, tuple]:
    """(numpy bool types, numpy integer types) when numpy is already loaded, else empty tuples:
    a numpy value can only reach us if numpy is imported, so this never imports it."""
    np = sys.modules.get("numpy")
    if np is None:
        return (), ()
    return (np.bool_,), (np.integer,)


def parse_bool(flag: str, value) -> bool:
    """A strict boolean: True/False (numpy too) or one of click's words (``"false"``, ``"no"``,
    ``"off"``, ``"0"``, ... case-insensitive) or the integers 0/1. Anything else (another string,
    another number, None) is a ValueError naming ``flag``: a string is never truthy just for being
    non-empty."""
    np_bool, np_int = _numpy_kinds()
    if isinstance(value, (bool, *np_bool)):
        return bool(value)
    if isinstance(value, (int, *np_int)) and value in (0, 1):  # click.BOOL takes 0/1 too (YAML `overwrite: 0`)
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(f"{flag} must be true or false (or one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}), got {value!r}")


@dataclass(frozen=True)
class Option:
    """A sampler-specific option: CLI flag ``--name-with-dashes``, API keyword ``name_with_underscores``.

    type: int | float | str | bool, or a tuple of allowed strings (a choice).
    min/max: inclusive numeric bounds checked for CLI and API alike.
    """

    name: str
    type: Any
    default: Any = None
    help: str = ""
    min: float | None = None
    max: float | None = None
    check: Any = None  # optional callable(value) raising ValueError with its own message (e.g. "auto" or a number)

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value):
        if value is None:
            return None
        if isinstance(self.type, tuple):
            if value not in self.type:
                raise ValueError(f"{self.flag} must be one of {list(self.type)}, got {value!r}")
            return value
        if self.type is bool:
            return parse_bool(self.flag, value)
        try:
            if self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError
            else:
                value = self.type(value)
        except (TypeError, ValueError, OverflowError):
            tname = getattr(self.type, "__name__", str(self.type))
            raise ValueError(f"{self.flag} must be a finite {tname}, got {value!r}") from None
        if self.min is not None and value < self.min:
            raise ValueError(f"{self.flag} must be >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise ValueError(f"{self.flag} must be <= {self.max}, got {value}")
        if self.check is not None:
            self.check(value)
        return value


# -- common option checks ----------------------------------------------------------------------
def load_config_file(path: str | os.PathLike) -> dict:
    """YAML/JSON recipe -> dict of option defaults (dash or underscore keys)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"config must be the path of a YAML/JSON recipe file (str or os.PathLike), got {type(path).__name__}")
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read config file {path}: {err}") from err
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # yaml.YAMLError, json.JSONDecodeError
        raise ValueError(f"config file {path} is not valid YAML/JSON: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    if isinstance(data.get("run"), dict):  # allow a `run:` table (click default_map style)
        data = data["run"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _intlike(v) -> bool:
    try:
        return float(v).is_integer()
    except (TypeError, ValueError, OverflowError):
        return False


def _int(name, value, lo):
    flag = "--" + name.replace("_", "-")
    _, np_int = _numpy_kinds()
    if isinstance(value, bool) or not isinstance(value, (int, *np_int)) and not (isinstance(value, (float, str)) and _intlike(value)):
        raise ValueError(f"{flag} must be an integer, got {value!r}")
    value = int(float(value)) if isinstance(value, (float, str)) else int(value)
    if value < lo:
        raise ValueError(f"{flag} must be >= {lo}, got {value}")
    return value


def _bool(name, value):
    return parse_bool("--" + name.replace("_", "-"), value)


def _float(name, value):
    flag = "--" + name.replace("_", "-")
    np_bool, _ = _numpy_kinds()
    if isinstance(value, (bool, *np_bool)):
        raise ValueError(f"{flag} must be a number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{flag} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be finite, got {value}")
    return value


def _threads(value) -> int | str:
    """--threads: "auto" (chosen from the work, gensample.threads) or an integer >= 1."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _int("threads", value, 1)
    except ValueError:
        raise ValueError(f"--threads must be auto or an integer >= 1, got {value!r}") from None


def _guidance_scale(value) -> float:
    """w of CFG, eps_u + w (eps_c - eps_u) (Ho & Salimans 2022, eq. 6): w = 0 is the unconditional
    model, 1 the conditional one, w > 1 guidance. A negative w steers *away* from the condition,
    which no sampler here is meant for, so it is refused rather than accepted silently."""
    w = _float("guidance_scale", value)
    if w < 0:
        raise ValueError(f"--guidance-scale must be >= 0 (0 = unconditional, 1 = conditional, > 1 = classifier-free "
                         f"guidance); a negative scale would push samples away from the condition, got {w:g}")
    return w


def normalize_prompts(value: Any, flag: str = "--prompt") -> list[str] | None:
    """None | str | sequence of str -> None or a non-empty list of str (ValueError otherwise)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"{flag} must be a string or a non-empty list of strings, got {value!r}")


def read_prompts_file(path: str | Path) -> list[str]:
    """``--prompts FILE``: one prompt per line (blank lines skipped; a line may be ``""``-less text)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {path}: cannot read the file ({err.__class__.__name__}: {err})") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: the file holds no prompt (one prompt per line)")
    return prompts


def _text_options(merged: dict, skip: set) -> dict:
    """prompt (str or list of str -> list), negative_prompt, guidance_rescale in [0, 1], height /
    width (ints >= 1), weights_variant (e.g. "fp16"), max_sequence_length (int in [1, 512]); all
    None when unset. A key the sampler declares itself (``skip``) is left to the sampler's own option."""
    out: dict[str, Any] = {}
    if "prompt" not in skip:
        out["prompt"] = normalize_prompts(merged.get("prompt"))
    if "negative_prompt" not in skip:
        neg = merged.get("negative_prompt")
        if neg is not None and not isinstance(neg, str):
            raise ValueError(f"--negative-prompt must be a string, got {neg!r}")
        out["negative_prompt"] = neg
    if "guidance_rescale" not in skip:
        gr = merged.get("guidance_rescale")
        gr = None if gr is None else _float("guidance_rescale", gr)
        if gr is not None and not 0.0 <= gr <= 1.0:
            raise ValueError(f"--guidance-rescale must be in [0, 1], got {gr}")
        out["guidance_rescale"] = gr
    for key in ("height", "width"):
        if key not in skip:
            out[key] = None if merged.get(key) is None else _int(key, merged[key], 1)
    if "weights_variant" not in skip:
        wv = merged.get("weights_variant")
        if wv is not None and (not isinstance(wv, str) or not re.fullmatch(r"[A-Za-z0-9_]+", wv)):
            raise ValueError(f"--weights-variant must be a variant name such as fp16, got {wv!r}")
        out["weights_variant"] = wv
    if "max_sequence_length" not in skip:
        msl = merged.get("max_sequence_length")
        try:
            length = None if msl is None else _int("max_sequence_length", msl, 1)
        except ValueError:
            length = 0
        if length is not None and not 1 <= length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"--max-sequence-length must be an integer in [1, {MAX_SEQUENCE_LENGTH}] (the T5 token "
                             f"length of SD3 / Flux prompts), got {msl!r}")
        out["max_sequence_length"] = length
    return out


# -- sampler catalogues: the registry, or the manifest ------------------------------------------
def _registry():
    """The full registry module (imports torch and every sampler). Looked up by name: the registry
    is the plug-in side that imports this module (its ``Option``), never the other way round."""
    return importlib.import_module("gensample.samplers.registry")


def resolve_options(sampler: str, config: str | None = None, *, _catalog=None, **options) -> dict:
    """Merge recipe file < explicit options; validate everything; fill defaults.

    ``_catalog`` (internal): where sampler specs come from; default the full registry. With the
    manifest (:func:`manifest`) the same checks run without torch, except those that need a
    sampler's code (option ``check`` callables, group sizes, implied options)."""
    catalog = _catalog if _catalog is not None else _registry()  # the module has get() and all_options()
    spec = catalog.get(sampler)
    merged: dict[str, Any] = {}
    if config is not None:
        merged.update(load_config_file(config))
        # an explicit sampler wins over the recipe's `sampler:` key (run() reads the key when none is given)
    merged.update({k: v for k, v in options.items() if v is not None})
    merged["sampler"] = sampler
    allowed_specific = {o.key: o for o in spec.options}
    known_elsewhere = catalog.all_options()
    unknown = [k for k in merged if k not in COMMON_KEYS and k not in allowed_specific and k != "num_processes"]
    for k in unknown:
        if k in ("flow", "flow_shift") and k in known_elsewhere:  # the flow form of a mixture (docs/flow_matching.md)
            specs = getattr(catalog, "SAMPLERS", None) or getattr(catalog, "samplers", {})
            takers = sorted(n for n, sp in specs.items() if any(o.key == "flow" for o in sp.options))
            raise ValueError(f"option {known_elsewhere[k].flag}: sampler {sampler!r} does not run on flow-matching models "
                             f"(docs/flow_matching.md); the samplers that do: {takers}")
        if k in known_elsewhere:
            raise ValueError(f"option {known_elsewhere[k].flag} does not apply to sampler {sampler!r}; "
                             f"its options: {sorted(o.flag for o in spec.options) or 'none'}")
        raise ValueError(f"unknown option {k!r}; allowed: {sorted(set(COMMON_KEYS) | set(allowed_specific))}")
    out: dict[str, Any] = {"sampler": sampler}
    model = merged.get("model", spec.default_model)
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"--model must be a non-empty model spec (zoo name, prefix:FILE, folder or hub id), got {model!r}; "
                         f"leave it out for the sampler's demo model {spec.default_model!r}")
    out["model"] = model
    steps = merged.get("steps")
    if steps is None:
        steps = spec.default_steps(merged) if callable(spec.default_steps) else spec.default_steps
    out["steps"] = _int("steps", steps, 1) if steps is not None else None
    out["num_samples"] = _int("num_samples", merged.get("num_samples", 16), 1)
    out["batch_size"] = _int("batch_size", merged.get("batch_size", 256), 1)
    cl = merged.get("class_label")
    out["class_label"] = None if cl is None else _int("class_label", cl, 0)
    out["guidance_scale"] = _guidance_scale(merged.get("guidance_scale", 1.0))
    out["seed"] = _int("seed", merged.get("seed", 0), 0)
    out["device"] = str(merged.get("device", "auto"))
    dt = str(merged.get("dtype", "fp32"))
    if dt not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPE_NAMES)}, got {dt!r}")
    out["dtype"] = dt
    output = merged.get("output")
    if output is not None and (not isinstance(output, (str, os.PathLike)) or not str(output).strip()):
        raise TypeError(f"--output must be a folder path (str or os.PathLike), got {output!r}")
    out["output"] = None if output is None else str(output)
    out["overwrite"] = _bool("overwrite", merged.get("overwrite", False))  # strict: "false"/"no" are False
    out["progress"] = _bool("progress", merged.get("progress", True))
    out["compile"] = _bool("compile", merged.get("compile", False))
    out["max_samples"] = _int("max_samples", merged.get("max_samples", MAX_SAMPLES), 1)
    out["threads"] = _threads(merged.get("threads", "auto"))
    out.update(_text_options(merged, skip=set(allowed_specific)))
    if out["num_samples"] > out["max_samples"]:
        raise ValueError(f"--num-samples {out['num_samples']} is more than --max-samples {out['max_samples']} "
                         f"(about {-(-out['num_samples'] // out['batch_size'])} batches of {out['batch_size']}); "
                         f"pass --max-samples {out['num_samples']} to draw that many, or lower --num-samples")
    for key, opt in allowed_specific.items():
        value = merged.get(key, opt.default)
        out[key] = opt.validate(value)
    if out.get("flow_shift") is not None and not out.get("flow"):
        raise ValueError("--flow-shift applies with --flow only")
    implied = getattr(spec, "implied", None)
    if implied is not None:  # options another option implies (fkc: --guidance-scale alone -> the CFG target)
        implied(out, {k for k in merged if k != "sampler"})
    group_size = getattr(spec, "group_size", None)
    if group_size is not None:
        g = group_size(out)
        if out["num_samples"] % g:
            hint = getattr(spec, "group_hint", None)
            fix = hint(out, g) if hint is not None else f"pass -n {-(-out['num_samples'] // g) * g}"
            raise ValueError(f"--num-samples ({out['num_samples']}) must be a multiple of the group size {g} "
                             f"for sampler {sampler!r}; {fix}")
        out["batch_size"] = max(g, out["batch_size"] // g * g)
    return out


def check_output_folder(output: str | None) -> None:
    """The output checks that need no model: ``--output`` and its nearest existing parent must be
    folders (a file on the way can never hold the run)."""
    if output is None:
        return
    p = Path(output)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--output {output} exists and is not a directory")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--output {output}: {parent} is a file, not a folder; choose another --output")
            break


# -- the manifest ---------------------------------------------------------------------------------
MANIFEST_FORMAT = 1
_PKG = Path(__file__).resolve().parent
SHIPPED = _PKG / "options_manifest.json"
_SPEC_DIRS = ("samplers", "runs")  # packages whose modules registry.discover() imports


@dataclass
class ManifestSpec:
    """A sampler spec read from the manifest: what option checks and help need, no code."""

    name: str
    description: str
    default_model: str
    default_steps: int | None
    options: tuple = ()
    output: str = "continuous"
    grouped: bool = False
    group_size: Callable | None = None  # code: full registry only
    implied: Callable | None = None
    group_hint: Callable | None = None


@dataclass
class Manifest:
    samplers: dict = field(default_factory=dict)  # name -> ManifestSpec
    source: str = "shipped"  # "shipped" | "cache" | "built"

    def get(self, name: str) -> ManifestSpec:
        if name not in self.samplers:
            raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(self.samplers)}")
        return self.samplers[name]

    def all_options(self) -> dict:
        return merge_options(self.samplers.values())


def merge_options(specs) -> dict:
    """Every sampler-specific option by key, over ``specs`` (objects with ``name`` and ``options``),
    as the CLI declares it once for all samplers: a choice shared by several samplers allows the
    union of their values (each sampler still checks its own in ``resolve_options``), and a help
    text the samplers do not share says so instead of showing one sampler's meaning."""
    import dataclasses

    decls: dict[str, list] = {}
    for spec in specs:
        for opt in spec.options:
            decls.setdefault(opt.key, []).append((spec.name, opt))
    out: dict[str, Option] = {}
    for key, pairs in decls.items():
        first = pairs[0][1]
        if len(pairs) == 1:
            out[key] = first
            continue
        changes = {}
        if isinstance(first.type, tuple):
            values = list(first.type)
            for _, opt in pairs[1:]:
                values += [v for v in (opt.type if isinstance(opt.type, tuple) else ()) if v not in values]
            changes["type"] = tuple(values)
        if len({opt.help for _, opt in pairs}) > 1:
            names = ", ".join(sorted(name for name, _ in pairs))
            changes["help"] = f"Option of {names}; its meaning and values per sampler: `gensample help SAMPLER`."
        out[key] = dataclasses.replace(first, **changes) if changes else first
    return out


def _spec_modules() -> list[str]:
    """Module names registry.discover() imports (a new sampler file changes the key)."""
    names = []
    for sub in _SPEC_DIRS:
        for f in sorted((_PKG / sub).glob("*.py")):
            names.append(f"{sub}/{f.name}")
    return names


def source_key(deps: Sequence[str]) -> str:
    """SHA-256 over the spec modules' names and the bytes of every file in ``deps`` (paths
    relative to the package); a missing file counts as a change."""
    h = hashlib.sha256(f"format {MANIFEST_FORMAT}\n".encode())
    for name in _spec_modules():
        h.update(f"module {name}\n".encode())
    for rel in sorted(deps):
        try:
            data = (_PKG / rel).read_bytes()
        except OSError:
            data = b"<missing>"
        h.update(f"file {rel} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def _type_from_json(t) -> Any:
    if isinstance(t, list):
        return tuple(t)
    return {"int": int, "float": float, "str": str, "bool": bool}[t]


def package_files(modules) -> list[str]:
    """Paths (relative to the package) of the ``gensample`` modules among ``modules`` that can shape
    the registry (the CLI and this module cannot)."""
    out = []
    for mod in list(modules):
        f = getattr(mod, "__file__", None)
        if not f or not getattr(mod, "__name__", "").startswith("gensample."):
            continue
        try:
            rel = Path(f).resolve().relative_to(_PKG)
        except ValueError:
            continue
        if rel.parts[0] == "cli" or rel.as_posix() in ("options.py", "threads.py"):
            continue
        out.append(rel.as_posix())
    return out


def discover_deps() -> list[str]:
    """The package files a fresh ``registry.discover()`` imports (run in a clean subprocess)."""
    import subprocess

    code = ("import json, sys\nfrom gensample.samplers import registry\nregistry.discover()\n"
            "from gensample.options import package_files\nprint(json.dumps(package_files(sys.modules.values())))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    return json.loads(res.stdout.strip().splitlines()[-1])


def _from_data(data: dict, source: str) -> Manifest:
    specs = {}
    for name, s in data["samplers"].items():
        opts = tuple(Option(o["name"], _type_from_json(o["type"]), o["default"], o["help"], o["min"], o["max"])
                     for o in s["options"])
        specs[name] = ManifestSpec(name, s["description"], s["default_model"], s["default_steps"], opts,
                                   s["output"], s["grouped"])
    return Manifest(specs, source)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    return data


def shipped_is_current() -> bool:
    """True when the shipped manifest matches today's sources (a test asserts it)."""
    data = _read(SHIPPED)
    return data is not None and data.get("key") == source_key(data.get("deps", []))


def user_cache_dir() -> Path:
    """gensample's folder in the user cache ($XDG_CACHE_HOME or ~/.cache): the manifest and `list` caches."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gensample"


def _cache_file() -> Path:
    return user_cache_dir() / "options-manifest.json"


_MANIFEST: Manifest | None = None


def manifest() -> Manifest:
    """The sampler manifest: the shipped file when current, else the user-cache copy when
    current, else rebuilt from the registry (imports torch once) and cached. Never stale."""
    global _MANIFEST
    if _MANIFEST is not None:
        return _MANIFEST
    for path, source in ((SHIPPED, "shipped"), (_cache_file(), "cache")):
        data = _read(path)
        if data is not None and data.get("key") == source_key(data.get("deps", [])):
            _MANIFEST = _from_data(data, source)
            return _MANIFEST
    data = _registry().manifest_data()
    try:
        from .io import atomic_write_json

        atomic_write_json(_cache_file(), data)
    except OSError:  # a read-only home: no cache, still an answer
        pass
    _MANIFEST = _from_data(data, "built")
    return _MANIFEST


def write_shipped() -> Path:
    """Regenerate the shipped manifest (``python -m gensample.options --write``)."""
    from .io import atomic_write_json

    data = _registry().manifest_data(discover_deps())
    atomic_write_json(SHIPPED, data)
    return SHIPPED


if __name__ == "__main__":  # python -m gensample.options --write | --check
    if sys.argv[1:] == ["--write"]:
        print(f"wrote {write_shipped()}")
    elif sys.argv[1:] == ["--check"]:
        ok = shipped_is_current()
        print("options_manifest.json is current" if ok else "options_manifest.json is stale: run python -m gensample.options --write")
        sys.exit(0 if ok else 1)
    else:
        print("usage: python -m gensample.options --write | --check", file=sys.stderr)
        sys.exit(2)
