"""`gensample fid` and `gensample fid-stats`: Inception-v3 FID through torch-fidelity (docs/fid.md)."""

from __future__ import annotations

import json

import click

from . import user_errors


@click.command(name="fid", context_settings={"show_default": True})
@click.argument("samples", type=click.Path(exists=True))
@click.option("--ref", required=True, type=click.Path(exists=True), help="Reference: folder of PNGs, run folder, samples.npz, or a .npz with mu/sigma (from fid-stats).")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None, help="Local torch-fidelity Inception-v3 weights (.pth); default downloads / torch hub cache.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option("--device", default="cpu", help="cpu | cuda | cuda:N")
@click.option("--dims", type=click.Choice(["64", "192", "768", "2048"]), default="2048", help="Inception feature layer; 2048 (pool3) is the standard, comparable FID.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print {\"fid\": ...} as JSON.")
@user_errors
def fid_cmd(samples, ref, inception_weights, batch_size, device, dims, as_json):
    """Inception FID of SAMPLES (folder of PNGs, run folder or samples.npz) against --ref."""
    from ..eval.fid import inception_fid

    value = inception_fid(samples, ref, inception_weights, batch_size=batch_size, device=device, progress=not as_json, dims=int(dims))
    click.echo(json.dumps({"fid": value}) if as_json else f"FID {value:.4f}")


@click.command(name="fid-stats", context_settings={"show_default": True})
@click.argument("folder", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npz (mu, sigma, and mergeable count/total/outer).")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None, help="Local torch-fidelity Inception-v3 weights (.pth).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option("--device", default="cpu", help="cpu | cuda | cuda:N")
@click.option("--dims", type=click.Choice(["64", "192", "768", "2048"]), default="2048", help="Inception feature layer; 2048 (pool3) is the standard, comparable FID.")
@user_errors
def fid_stats_cmd(folder, out, inception_weights, batch_size, device, dims):
    """Reference Inception statistics of FOLDER (PNGs, run folder or samples.npz) -> --out ref.npz."""
    from ..eval.fid import inception_extractor, inception_stats, load_images

    stats = inception_stats(load_images(folder), inception_extractor(inception_weights, device, int(dims)), batch_size, progress=True)
    stats.save(out)
    click.echo(f"{stats.count} images -> {out}")


def register(main: click.Group) -> None:
    main.add_command(fid_cmd)
    main.add_command(fid_stats_cmd)
