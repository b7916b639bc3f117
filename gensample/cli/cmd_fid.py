"""`gensample fid` and `gensample fid-stats`: Inception-v3 FID through torch-fidelity (docs/fid.md)."""

from __future__ import annotations

import json

import click

from . import UserError, user_errors


def check_inception_weights(path) -> None:
    """A cheap look at --inception-weights before torch reads it: a torch.save file is a zip
    archive holding ``*/data.pkl`` (or, from old torch, a pickle starting with byte 0x80).
    Anything else gets one clear message instead of the unpickler's "invalid literal for int()"."""
    import zipfile

    if path is None:
        return
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("data.pkl") for n in z.namelist()):
                    return
        else:
            with open(path, "rb") as f:
                if f.read(1) == b"\x80":
                    return
    except OSError as err:
        raise UserError(f"--inception-weights {path}: cannot read it ({err.strerror or err})") from None
    except zipfile.BadZipFile:
        pass
    raise UserError(f"--inception-weights {path} is not a torch-fidelity Inception-v3 weights file "
                    f"(a .pth state dict written by torch.save); see docs/fid.md for how to get one")


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
    """Inception FID of SAMPLES (folder of PNGs, run folder or samples.npz) against --ref.

    Caveats (fewer images than --dims, samples and reference of different resolution or
    channels) print as warnings and are listed under "caveats" in --json."""
    from ..eval.fid import fid_report, sample_weights

    check_inception_weights(inception_weights)
    rep = fid_report(samples, ref, inception_weights, batch_size=batch_size, device=device, progress=not as_json, dims=int(dims))
    if sample_weights(samples) is not None:  # FKC --final weighted: the statistics used the run's weights
        click.echo(f"{samples}: weighted by the `weights` in its samples.npz (weighted feature mean and covariance)", err=True)
    click.echo(json.dumps(rep) if as_json else f"FID {rep['fid']:.4f}" + (" (see the caveats above)" if rep["caveats"] else ""))


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
    from ..eval.fid import inception_extractor, inception_stats, load_images, sample_weights, source_shape

    check_inception_weights(inception_weights)
    images = load_images(folder)
    stats = inception_stats(images, inception_extractor(inception_weights, device, int(dims)), batch_size, progress=True,
                            weights=sample_weights(folder, len(images)))  # FKC weighted samples: weighted statistics
    stats.save(out, image_shape=source_shape(folder)[1])  # lets `fid` warn about another resolution / channels
    click.echo(f"{stats.count} images -> {out}")


def register(main: click.Group) -> None:
    main.add_command(fid_cmd)
    main.add_command(fid_stats_cmd)
