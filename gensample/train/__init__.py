"""Training loops for the small embedded models (the shipped weights come from these)."""


def save_masked_lm(out_dir, net, tokenizer, loss_rows) -> None:
    """Write a trained masked-diffusion LM folder: the network (config.json + safetensors, via
    ``save_pretrained``), ``tokenizer.json`` and the loss curve ``loss.csv`` (step, loss, lr,
    elapsed_s), the text files written atomically. The caller adds ``train.json``."""
    import csv
    import io
    from pathlib import Path

    from ..io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out, safe_serialization=True)
    tokenizer.save(out / "tokenizer.json")
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "elapsed_s"])
    writer.writeheader()
    writer.writerows(loss_rows)
    atomic_write_bytes(out / "loss.csv", buf.getvalue().encode())
