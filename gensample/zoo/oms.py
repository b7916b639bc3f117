"""OMS demo models (docs/oms.md "Shipped models"): 16x16 brightness digits on a non-zero terminal SNR
schedule, its schedule-fix baselines, and its OMS module. Weights come from
`gensample train flawed [--variant ...]` and `gensample train oms --base digits-flawed`; the exact
command and loss curve sit beside them (train.json, loss.csv)."""

from __future__ import annotations

from ..models.loading import LoadedModel, load_diffusers
from . import DATA, register

OMS_DIR = DATA / "digits-flawed-oms"


def _brightness_model(name: str, folder: str) -> LoadedModel:
    from ..models.oms_training import brightness_digits

    path = DATA / folder
    if not (path / "config.json").exists():
        raise ValueError(f"zoo model {name!r} has no weights in {path}; run `gensample train flawed` (see docs/oms.md)")
    model = load_diffusers(str(path), name=name)
    model.extras["dataset"] = brightness_digits
    if (OMS_DIR / "config.json").exists():
        model.extras["oms_module"] = OMS_DIR
    return model


@register("digits-flawed", "16x16 brightness digits, 3 brightness classes, alpha_bar_T = 0.048 (OMS demo base)")
def digits_flawed() -> LoadedModel:
    return _brightness_model("digits-flawed", "digits-flawed")


@register("digits-flawed-zsnr", "digits-flawed data on the zero-terminal-SNR schedule, v-pred (Lin et al. baseline)")
def digits_flawed_zsnr() -> LoadedModel:
    return _brightness_model("digits-flawed-zsnr", "digits-flawed-zsnr")


@register("digits-flawed-offset", "digits-flawed trained with offset noise delta = 0.1 (crosslabs baseline)")
def digits_flawed_offset() -> LoadedModel:
    return _brightness_model("digits-flawed-offset", "digits-flawed-offset")


@register("digits-flawed-oms", "OMS module for the digits-flawed family (class-conditional, kind 'oms')")
def digits_flawed_oms() -> LoadedModel:
    from ..models.oms import OMSModule

    if not (OMS_DIR / "config.json").exists():
        raise ValueError(f"no OMS weights in {OMS_DIR}; run `gensample train oms --base digits-flawed`")
    module = OMSModule.from_pretrained(OMS_DIR).eval()
    return LoadedModel(name="digits-flawed-oms", kind="oms", unet=module, scheduler_config={},
                       event_shape=(module.config.in_channels, 16, 16), num_classes=module.config.num_class_embeds - 1,
                       null_class=module.null_class, is_image=True)
