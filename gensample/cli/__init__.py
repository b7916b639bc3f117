"""The `gensample` command line (Click). Thin: parse, call gensample.api, report.

Exit codes: 0 done; 2 a user error (ValueError/TypeError from the API: one message, no
traceback); 1 the run could not finish (NaN/Inf stop, the model's own forward failed, a launched process died, the output folder
is read-only / full / in use); 130 Ctrl-C and 143 SIGTERM (run.json says ``interrupted``, the
finished shards are kept: the same command resumes).

Start-up is kept light: importing this module loads click only. torch, diffusers and the sampler
modules load when a command needs them. `run`'s sampler-specific flags, `--help` and `gensample help
S` come from the sampler manifest (``gensample.options.manifest``: JSON, never stale), and `run`
checks every option, file and the output folder against it before importing torch, so a usage
error answers in well under a second. `gensample list` reads a cache of the registry (in the user
cache folder, rebuilt whenever a file of the package changes).

Subcommand modules ``gensample/cli/cmd_*.py`` define ``register(main)`` and are picked up
automatically; ``gensample train`` subcommands attach to the ``train`` group.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
import signal
from pathlib import Path

import click

from .. import __version__


class UserError(click.UsageError):
    """Exit 2 with a clear message."""


def user_errors(fn):
    """Decorator: ValueError/TypeError/FileNotFoundError -> exit 2 message; NaN stop, a dead
    launched process, or an output folder that cannot be written (OSError) -> exit 1 message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise UserError(str(err)) from None
        except (FloatingPointError, ChildProcessError) as err:  # NaN stop; a launched process died
            raise click.ClickException(str(err)) from None
        except RuntimeError as err:  # core.denoiser.ModelCallError: the network's own call failed (exit 1)
            if err.__class__.__name__ == "ModelCallError":
                raise click.ClickException(str(err)) from None
            raise
        except OSError as err:  # api.OutputError (names --output) or another file-system error
            msg = str(err) if err.__class__.__name__ == "OutputError" else f"file-system error: {err}"
            raise click.ClickException(msg) from None
        except MemoryError:
            raise click.ClickException("out of memory; lower --batch-size or --num-samples") from None

    return wrapper


class _Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings in the CLI: one line ``warning: ...`` on stderr, without the source line."""
    text = " ".join(str(message).split())
    click.echo(f"warning: {text}", err=True)


class _Group(click.Group):
    """The top-level group: Ctrl-C and SIGTERM end any command with one line and exit 130/143
    (the run itself has recorded ``interrupted`` in run.json by then), never a traceback.
    Python warnings print as one clean line ``warning: ...`` (``_show_warning``)."""

    def invoke(self, ctx):
        import threading
        import warnings

        old_show = warnings.showwarning
        warnings.showwarning = _show_warning

        old = None
        if threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise _Interrupted(signum)

            old = signal.signal(signal.SIGTERM, on_term)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            click.echo(f"\ngensample: interrupted ({signal.Signals(signum).name}); finished shards are kept, "
                       f"run the same command again to resume", err=True)
            ctx.exit(128 + int(signum))
        finally:
            warnings.showwarning = old_show
            if old is not None:
                signal.signal(signal.SIGTERM, old)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="gensample")
def main() -> None:
    """gensample: research-grade diffusion samplers for Hugging Face diffusers."""


@main.group()
def train() -> None:
    """Train the small embedded models (their shipped weights come from these commands)."""


# -- `gensample run` -------------------------------------------------------------------------
def _click_type(opt):
    if isinstance(opt.type, tuple):
        return click.Choice(list(opt.type))
    return {int: int, float: float, str: str, bool: bool}.get(opt.type, str)


def _defaults_text(key: str, man) -> str:
    """Per-sampler defaults of option ``key``: "ddim, oms: default 0.0; fkc: default 1.0"."""
    by_default: dict[str, list[str]] = {}
    for spec in man.samplers.values():
        for o in spec.options:
            if o.key == key:
                by_default.setdefault(repr(o.default) if not isinstance(o.default, str) else o.default, []).append(spec.name)
    return "; ".join(f"{', '.join(sorted(names))}: default {d}" for d, names in sorted(by_default.items(), key=lambda kv: sorted(kv[1])))


_TEXT_KEYS = ("prompt", "negative_prompt", "guidance_rescale", "height", "width", "weights_variant", "max_sequence_length")


def _option_param(opt, help_text: str) -> click.Parameter:
    if opt.type is bool:
        return click.Option([f"{opt.flag}/--no-{opt.name.replace('_', '-')}", opt.key], default=None, help=help_text)
    return click.Option([opt.flag, opt.key], type=_click_type(opt), default=None, help=help_text)


def _manifest():
    """The sampler manifest (names, defaults, option declarations) without importing torch."""
    from .. import options

    return options.manifest()


def _sampler_choice(man) -> click.Parameter:
    return click.Option(["--sampler"], type=click.Choice(sorted(man.samplers)), default=None,
                        help="Sampling method (see `gensample list`).")


def _sampler_params() -> list[click.Parameter]:
    """--sampler (a choice of the registered samplers) and every sampler-specific flag."""
    man = _manifest()
    params: list[click.Parameter] = [_sampler_choice(man)]
    specific = man.all_options()
    for key in sorted(specific):
        if key in _TEXT_KEYS:  # run's own flag (--prompt, --guidance-rescale) feeds the sampler's option too
            continue
        params.append(_option_param(specific[key], f"{specific[key].help} [{_defaults_text(key, man)}]"))
    return params


def _one_sampler_params(name: str) -> list[click.Parameter] | None:
    """--sampler and only sampler ``name``'s own flags, each with ``name``'s default (read from
    the sampler's ``Option``, the one home of that default); None for an unknown name."""
    man = _manifest()
    spec = man.samplers.get(name)
    if spec is None:
        return None
    params: list[click.Parameter] = [_sampler_choice(man)]
    for opt in sorted(spec.options, key=lambda o: o.key):
        if opt.key in _TEXT_KEYS:
            continue
        shown = "" if opt.default is None else f" [{name}: default {opt.default}]"
        params.append(_option_param(opt, f"{opt.help}{shown}"))
    return params


_HELP_SAMPLER = "gensample.help_sampler"  # ctx.meta key: `run --sampler S --help` shows only S


def _peek_sampler(args: list[str]) -> str | None:
    """The value of --sampler in raw arguments when they also ask for help, else None."""
    if not any(a in ("--help", "-h") for a in args):
        return None
    for i, arg in enumerate(args):
        if arg == "--sampler" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--sampler="):
            return arg.split("=", 1)[1]
    return None


class _LazyRunCommand(click.Command):
    """`run` builds --sampler and the sampler flags (from the manifest) only when it is invoked or
    its --help is shown. With
    ``--sampler S --help`` the help lists only S's flags, with S's defaults."""

    def parse_args(self, ctx, args):
        name = _peek_sampler(list(args))
        if name is not None:
            ctx.meta[_HELP_SAMPLER] = name
        return super().parse_args(ctx, args)

    def get_params(self, ctx):
        if not getattr(self, "_built", False):
            self._built = True
            self._common = list(self.params)
            self.params[:0] = _sampler_params()
        name = ctx.meta.get(_HELP_SAMPLER)
        only = _one_sampler_params(name) if name is not None else None
        if only is None:
            return super().get_params(ctx)
        help_option = self.get_help_option(ctx)
        return only + [_steps_for(name, p) for p in self._common] + ([help_option] if help_option is not None else [])


def _steps_for(name: str, param: click.Parameter) -> click.Parameter:
    """--steps with sampler ``name``'s default step count in its help (other params unchanged)."""
    steps = _manifest().samplers[name].default_steps
    if param.name != "steps" or not isinstance(steps, int):
        return param
    return click.Option(["--steps"], type=int, default=None, help=f"Number of sampling steps [{name}: default {steps}].")


@main.command(cls=_LazyRunCommand, context_settings={"show_default": True})
@click.option("--model", "model", default=None, help="Zoo name, gmm:FILE.json, diffusers folder or hub id. Default: the sampler's demo model.")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, help="YAML recipe; its values are defaults that flags override.")
@click.option("--steps", type=int, default=None, help="Number of sampling steps [default: the sampler's].")
@click.option("-n", "--num-samples", "num_samples", type=int, default=None, help="Number of samples [default 16].")
@click.option("--batch-size", type=int, default=None, help="Most samples per model batch [default 256; lowered so a shard is written every few seconds and the batch fits in memory].")
@click.option("--class-label", type=int, default=None, help="Class label for class-conditional models.")
@click.option("--guidance-scale", type=float, default=None, help="CFG scale w (eps_u + w (eps_c - eps_u)) [default 1].")
@click.option("--prompt", "prompt", multiple=True, help="Text prompt (repeatable: sample i gets prompt i % count); text-to-image models [default: the empty prompt]. Token samplers: the fixed text prefix.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None, help="File of prompts, one per line (added after --prompt).")
@click.option("--negative-prompt", default=None, help="Text CFG's unconditional branch [default: the empty prompt].")
@click.option("--guidance-rescale", type=float, default=None, help="Rescaled CFG phi in [0, 1] (Lin et al. 2024) [default 0].")
@click.option("--height", type=int, default=None, help="Image height in pixels (latent models) [default: the model's].")
@click.option("--width", type=int, default=None, help="Image width in pixels (latent models) [default: the model's].")
@click.option("--weights-variant", default=None, help="Weights variant of a diffusers folder / hub id, e.g. fp16 (*.fp16.safetensors).")
@click.option("--max-sequence-length", type=int, default=None, help="T5 prompt length in tokens, 1-512 (SD3 / Flux "
              "pipelines only) [default: the pipeline's, SD3 256, Flux 512].")
@click.option("--seed", type=int, default=None, help="Global seed; sample i uses a seed derived from (seed, i) [default 0].")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N [default auto].")
@click.option("--dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]), help="Model dtype (fp16/bf16 on CUDA only) [default fp32].")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Output directory [default runs/<sampler>-<model>-<hash of the configuration>: the same command resumes it].")
@click.option("--overwrite", is_flag=True, default=False, help="Discard an existing run in --output instead of resuming it.")
@click.option("--max-samples", type=int, default=None, help="Refuse -n above this many samples [default 1000000].")
@click.option("--num-processes", type=int, default=None, help="Launch N local processes (sharded sampling; see docs/scaling.md).")
@click.option("--compile", "compile_unet", is_flag=True, default=False, help="torch.compile the UNet (CUDA runs).")
@click.option("--threads", default=None, help="CPU threads for torch: auto (one for small models and batches, all cores for "
              "large ones; an OMP_NUM_THREADS or torch setting of yours is kept) or N [default auto].")
@click.option("--no-progress", "no_progress", is_flag=True, default=False, help="No progress bar / progress lines.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the run record as JSON on stdout.")
@user_errors
def run(model, config, as_json, num_processes, compile_unet, no_progress, sampler=None, **options):
    """Draw samples with a sampler; write samples.npz, run.json and images to --output."""
    from .. import options as light

    if sampler is None and config is None:
        raise UserError("--sampler is required (or --config FILE with a `sampler:` key)")
    if sampler is None:
        sampler = light.load_config_file(config).get("sampler")
        if sampler is None:
            raise UserError(f"config file {config} has no `sampler:` key; pass --sampler")
    prompts = list(options.pop("prompt", None) or ())
    prompts_file = options.pop("prompts_file", None)
    if prompts_file is not None:
        prompts += light.read_prompts_file(prompts_file)
    if prompts:
        options["prompt"] = prompts[0] if len(prompts) == 1 else prompts
    opts = {k: v for k, v in options.items() if v is not None and v is not False}
    if options.get("overwrite"):
        opts["overwrite"] = True
    if no_progress:
        opts["progress"] = False
    if compile_unet:
        opts["compile"] = True
    # every check that needs no model, before torch is imported (a usage error answers at once)
    light.resolve_options(sampler, config=config, model=model, _catalog=_manifest(), **opts)
    light.check_output_folder(opts.get("output"))
    from .. import api

    if "output" not in opts and not (config and "output" in api.load_config_file(config)):
        cfg = api.resolve_options(sampler, config=config, model=model, **opts)
        opts["output"] = str(api.default_output_dir(cfg))
    if num_processes is not None:
        opts["num_processes"] = num_processes
    result = api.run(sampler=sampler, model=model, config=config, **opts)
    if not result.is_main:  # other processes of `accelerate launch`: the main one reports
        return
    rec = result.record
    if as_json:
        click.echo(json.dumps(rec, indent=2, default=api._json_default))
    else:
        out = rec["config"].get("output")
        click.echo(f"{sampler} on {rec['model']}: {rec['num_samples']} samples, NFE {rec.get('nfe')}, "
                   f"{rec['wall_time_s']:.2f} s on {rec['device']}" + (f" -> {out}" if out else ""))
        text = Path(out) / "samples.txt" if out else None  # token samplers: show a few decoded samples
        if text is not None and text.exists():
            for line in text.read_text().splitlines()[:4]:
                click.echo(f"  {line}")


@main.command(name="help")
@click.argument("sampler", required=False)
@click.pass_context
def help_cmd(ctx, sampler: str | None) -> None:
    """Show `run`'s help for SAMPLER only (its own flags and defaults), or this overview."""
    if sampler is None:
        click.echo(ctx.parent.get_help())
        return
    names = sorted(_manifest().samplers)
    if sampler not in names:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {names}")
    with run.make_context("run", ["--sampler", sampler, "--help"], parent=ctx.parent):
        pass


# -- `gensample list` --------------------------------------------------------------------------
def _listing_key() -> str:
    """Changes whenever any file of the installed package changes (name, size, mtime)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(__version__.encode())
    for f in sorted(root.rglob("*")):
        if f.suffix in (".py", ".json", ".safetensors") and "__pycache__" not in f.parts:
            st = f.stat()
            h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    from ..options import user_cache_dir

    return user_cache_dir()


def listing() -> dict:
    """{"samplers": [[name, description, demo model]], "zoo": [[name, description]],
    "prefixes": [[prefix, description]]}, from the cache when the package has not changed."""
    cache = _cache_dir() / f"list-{_listing_key()}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    from .. import zoo
    from ..models.loading import prefixes
    from ..samplers import registry

    registry.discover()
    zoo.discover()
    data = {"samplers": [[n, s.description, s.default_model] for n, s in sorted(registry.SAMPLERS.items())],
            "zoo": [[n, e.description] for n, e in sorted(zoo.ZOO.items())],
            "prefixes": [[p, d] for p, d in sorted(prefixes().items())]}
    try:
        from ..io import atomic_write_json

        for old in cache.parent.glob("list-*.json"):
            old.unlink(missing_ok=True)
        atomic_write_json(cache, data)
    except OSError:  # a read-only home: no cache, still a listing
        pass
    return data


@main.command(name="list")
def list_cmd() -> None:
    """List samplers and zoo models."""
    data = listing()
    rows = {"Samplers:": [(n, f"{d} (demo model: {m})") for n, d, m in data["samplers"]],
            "Zoo models:": [(n, d) for n, d in data["zoo"]],
            "Model specs:": [(p + ":FILE", d) for p, d in data["prefixes"]] + [("PATH | HUB_ID", "a diffusers UNet/pipeline folder or hub id")]}
    width = max(len(name) for section in rows.values() for name, _ in section)
    for title, section in rows.items():
        click.echo(title)
        for name, desc in section:
            click.echo(f"  {name:<{width}}  {desc}")


def _discover_commands() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("cmd_"):
            module = importlib.import_module(f"{__name__}.{mod.name}")
            module.register(main)


_discover_commands()


if __name__ == "__main__":  # python -m gensample.cli
    main()
