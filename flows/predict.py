"""imer predict: the emotion of new clips (any subset of audio, video and transcript per utterance).

Inputs: one utterance (`--audio x.wav --video x.mp4 --text x.txt`), a folder (files grouped
by stem), or a listing in the ingest format (`utterance_id`, `audio_path`, `text_path`,
`video_path`; optionally `dialogue`, `turn`, `speaker`: rows sharing a dialogue are one
conversation in turn order, read in context by a model trained with `train.context: dialogue`,
see `pipeline/serving/dialogues.py`; single utterances and folders are dialogues of one).
The model is `models:/<name>@champion` from MLflow by default, or a checkpoint
(`--model models/model.pt`). Its extractors are rebuilt from the recipes stored with it
and refused when their config hash is not the one it was trained on.
A bad or absent file makes that modality missing (with the extraction stages' reason),
never a failure; an utterance with nothing usable gets the training prior (`used_prior`).
Output, one row per utterance in input order (`dialogue` / `turn` echoed when given): a table
on stdout, or CSV / JSON / Parquet by the suffix of `--out`.
Exit codes: 0 done, 1 runtime error (model, recipes), 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.serving.media import MediaItem, items_from_folder, items_from_listing
from pipeline.serving.predict import Predictor

OUT_SUFFIXES = (".csv", ".json", ".parquet")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imer predict", description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("what to predict (one utterance, a folder or a listing)")
    src.add_argument("--audio", type=Path, help="audio file (.wav, .flac, .ogg)")
    src.add_argument("--video", type=Path, help="video file (.mp4, .avi); its audio is used when no --audio is given")
    src.add_argument("--text", type=Path, help="transcript (UTF-8 .txt)")
    src.add_argument("--id", help="utterance id of the single utterance (default: the first file's stem)")
    src.add_argument("--folder", type=Path, help="folder of clips grouped by stem (x.wav, x.mp4, x.txt)")
    src.add_argument("--listing", type=Path,
                     help="CSV/Parquet listing in the ingest format (optional dialogue, turn, speaker columns)")
    add_model_arguments(p.add_argument_group("which model"))
    p.add_argument("--out", type=Path, help=f"write the predictions here ({', '.join(OUT_SUFFIXES)}); default: print")
    p.add_argument("--params", default="params.yaml", help="params file for the default model name")
    return p


def gather(args: argparse.Namespace) -> list[MediaItem]:
    """The utterances the arguments name (usage errors raise ValueError)."""
    single = {f: getattr(args, f) for f in ("audio", "video", "text") if getattr(args, f) is not None}
    sources = sum(bool(x) for x in (single, args.folder, args.listing))
    if sources != 1:
        raise ValueError("give exactly one of: media files (--audio/--video/--text), --folder, --listing")
    if args.folder:
        return items_from_folder(args.folder)
    if args.listing:
        return items_from_listing(args.listing)
    uid = args.id or next(iter(single.values())).stem
    return [MediaItem(uid, dict(single))]


def add_model_arguments(group: argparse._ArgumentGroup) -> None:
    """The options that choose a model, shared by `imer predict` and `imer demo`."""
    group.add_argument("--model", type=Path, help="a checkpoint (models/model.pt) instead of the registry")
    group.add_argument("--model-uri", help="MLflow model URI (default: models:/<name>@champion)")
    group.add_argument("--model-name", help="registered model name (default: register.model_name or imer-<train.method>)")
    group.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking/registry URI (default: %(default)s)")
    group.add_argument("--features-dir", type=Path, default=Path("data/features"),
                       help="feature tables to read extractor recipes from when a checkpoint has none (default: %(default)s)")


def load_predictor(args: argparse.Namespace) -> Predictor:
    """A checkpoint with its recipes, or the registered pyfunc's own predictor."""
    if args.model is not None:
        from pipeline.methods.checkpoint import load_model
        from pipeline.methods.routing import serving_info
        from pipeline.serving.recipes import model_recipes

        model, extra = load_model(args.model)
        recipes = model_recipes(extra, args.features_dir if args.features_dir.is_dir() else None)
        if not recipes:
            raise ValueError(f"{args.model}: no extractor recipes stored with it and none under {args.features_dir} "
                             "with the hashes it was trained on; pass --features-dir with its feature tables")
        return Predictor(model, serving_info(extra["task"], extra["classes"], extra["prior"]), recipes,
                         extra.get("feature_config_hashes"))
    import mlflow

    from pipeline.tracking.runs import fluent_uri

    uri = args.model_uri or f"models:/{args.model_name or default_name(args.params)}@champion"
    with fluent_uri(args.tracking_uri):  # scoped: a global URI would capture later runs in this process
        wrapper = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    predictor = getattr(wrapper, "predictor", None)
    if predictor is None:
        raise ValueError(f"{uri}: not an imer model (no predictor inside the pyfunc)")
    return predictor


def default_name(params_path: str) -> str:
    from pipeline.core.params import load_all_params
    from pipeline.methods.registry import default_model_name

    try:
        params = load_all_params(params_path)
    except (FileNotFoundError, OSError):
        params = {}
    name = (params.get("register") or {}).get("model_name")
    return name or default_model_name((params.get("train") or {}).get("method", "mculora"))


def write(frame: pd.DataFrame, out: Path | None) -> None:
    if out is None:
        shown = frame.drop(columns=[c for c in frame.columns if c.endswith("_detail")])
        with pd.option_context("display.max_columns", None, "display.width", 200, "display.precision", 3):
            print(shown.to_string(index=False))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        frame.to_csv(out, index=False)
    elif out.suffix == ".json":
        frame.to_json(out, orient="records", indent=2)
    else:
        frame.to_parquet(out, index=False)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.out is not None and args.out.suffix not in OUT_SUFFIXES:
        p.error(f"--out must end in one of {', '.join(OUT_SUFFIXES)}")
    try:
        items = gather(args)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    try:
        frame = load_predictor(args).predict_items(items)
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        print(f"imer predict: error: {exc}", file=sys.stderr)
        return 1
    write(frame, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
