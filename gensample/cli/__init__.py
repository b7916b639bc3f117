"""The `gensample` command line (Click). Thin: parse, call gensample.api, report.

User errors (ValueError/TypeError from the API) become usage errors: exit code 2, one message,
no traceback. Subcommand modules ``gensample/cli/cmd_*.py`` define ``register(main)`` and are
picked up automatically; ``gensample train`` subcommands attach to the ``train`` group.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys

import click

from .. import __version__


class UserError(click.UsageError):
    """Exit 2 with a clear message."""


def user_errors(fn):
    """Decorator: ValueError/TypeError/FileNotFoundError -> exit 2 message; NaN stop -> exit 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise UserError(str(err)) from None
        except (FloatingPointError, ChildProcessError) as err:  # NaN stop; a launched process died
            raise click.ClickException(str(err)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="gensample")
def main() -> None:
    """gensample: research-grade diffusion samplers for Hugging Face diffusers."""


@main.group()
def train() -> None:
    """Train the small embedded models (their shipped weights come from these commands)."""


def _click_type(opt):
    if isinstance(opt.type, tuple):
        return click.Choice(list(opt.type))
    return {int: int, float: float, str: str, bool: bool}.get(opt.type, str)


def _run_options(fn):
    from ..samplers import registry

    registry.discover()
    specific = registry.all_options()
    for key in sorted(specific, reverse=True):
        opt = specific[key]
        users = sorted(s.name for s in registry.SAMPLERS.values() if any(o.key == key for o in s.options))
        help_text = f"{opt.help} [{', '.join(users)}; default {opt.default}]"
        if opt.type is bool:
            fn = click.option(f"{opt.flag}/--no-{opt.name.replace('_', '-')}", key, default=None, help=help_text)(fn)
        else:
            fn = click.option(opt.flag, key, type=_click_type(opt), default=None, help=help_text)(fn)
    return fn


def _sampler_choice():
    from ..samplers import registry

    return click.Choice(sorted(registry.discover()))


@main.command(context_settings={"show_default": True})
@click.option("--sampler", type=_sampler_choice(), default=None, help="Sampling method (see `gensample list`).")
@click.option("--model", "model", default=None, help="Zoo name, gmm:FILE.json, diffusers folder or hub id. Default: the sampler's demo model.")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, help="YAML recipe; its values are defaults that flags override.")
@click.option("--steps", type=int, default=None, help="Number of sampling steps.")
@click.option("-n", "--num-samples", "num_samples", type=int, default=None, help="Number of samples [default 16].")
@click.option("--batch-size", type=int, default=None, help="Samples per model batch [default 256].")
@click.option("--class-label", type=int, default=None, help="Class label for class-conditional models.")
@click.option("--guidance-scale", type=float, default=None, help="CFG scale w (eps_u + w (eps_c - eps_u)) [default 1].")
@click.option("--seed", type=int, default=None, help="Global seed; sample i uses a seed derived from (seed, i) [default 0].")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N [default auto].")
@click.option("--dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]), help="Model dtype (fp16/bf16 on CUDA only) [default fp32].")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Output directory [default runs/<sampler>].")
@click.option("--overwrite", is_flag=True, default=False, help="Discard an existing run in --output instead of resuming it.")
@click.option("--num-processes", type=int, default=None, help="Launch N local processes (sharded sampling; see docs/scaling.md).")
@click.option("--compile", "compile_unet", is_flag=True, default=False, help="torch.compile the UNet (CUDA runs).")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the run record as JSON on stdout.")
@_run_options
@user_errors
def run(sampler, model, config, as_json, num_processes, compile_unet, **options):
    """Draw samples with a sampler; write samples.npz, run.json and images to --output."""
    from .. import api

    if sampler is None and config is None:
        raise UserError("--sampler is required (or --config FILE with a `sampler:` key)")
    if sampler is None:
        sampler = api.load_config_file(config).get("sampler")
        if sampler is None:
            raise UserError(f"config file {config} has no `sampler:` key; pass --sampler")
    opts = {k: v for k, v in options.items() if v is not None and v is not False}
    if options.get("overwrite"):
        opts["overwrite"] = True
    if "output" not in opts and not (config and "output" in api.load_config_file(config)):
        opts["output"] = f"runs/{sampler}"
    if num_processes is not None:
        opts["num_processes"] = num_processes
    if compile_unet:
        opts["compile"] = True
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
        from pathlib import Path

        text = Path(out) / "samples.txt" if out else None  # token samplers: show a few decoded samples
        if text is not None and text.exists():
            for line in text.read_text().splitlines()[:4]:
                click.echo(f"  {line}")


@main.command(name="list")
def list_cmd() -> None:
    """List samplers and zoo models."""
    from .. import zoo
    from ..models.loading import prefixes
    from ..samplers import registry

    registry.discover()
    zoo.discover()
    click.echo("Samplers:")
    for name in sorted(registry.SAMPLERS):
        spec = registry.SAMPLERS[name]
        click.echo(f"  {name:<16} {spec.description} (demo model: {spec.default_model})")
    click.echo("Zoo models:")
    for name in sorted(zoo.ZOO):
        click.echo(f"  {name:<16} {zoo.ZOO[name].description}")
    click.echo("Model specs:")
    for p, desc in sorted(prefixes().items()):
        click.echo(f"  {p + ':FILE':<16} {desc}")
    click.echo(f"  {'PATH | HUB_ID':<16} a diffusers UNet/pipeline folder or hub id")


def _discover_commands() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("cmd_"):
            module = importlib.import_module(f"{__name__}.{mod.name}")
            module.register(main)


_discover_commands()


if __name__ == "__main__":  # python -m gensample.cli
    main()
