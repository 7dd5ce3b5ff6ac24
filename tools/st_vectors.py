"""Vectors of another embedder for train.py --vectors and evaluate.py --vectors: a CSV's rows,
rendered with train.py's template, embedded by a sentence-transformers model.

    python tools/st_vectors.py sentence-transformers/all-MiniLM-L6-v2 train.csv runs/minilm.st
    python train.py --data train.csv --vectors runs/minilm.st --folds 5 --out runs/minilm
    python tools/st_vectors.py sentence-transformers/all-MiniLM-L6-v2 test.csv runs/minilm-test.st
    python evaluate.py --checkpoint runs/minilm --data test.csv --vectors runs/minilm-test.st

The file holds the vectors, the row ids (--id-col) and what made them: the embedder
("sentence-transformers"), the model's name and, for a local folder, its content identity (every
byte of its files), the pooling its modules use, whether the vectors are L2-normalised, the prompt
and the maximum sequence length. A head trained on them records all of it, and evaluate.py refuses
vectors made otherwise. A tool: sentence-transformers is a test and tools dependency
(requirements-dev.txt), never imported by the product.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's modules are one folder up

from at_scale.embed_cache import ours_file, write_vectors  # noqa: E402
from data import (MAP_TEMPLATE, check_ids, check_out, read_csv, require_columns,  # noqa: E402
                  row_texts)


def folder_identity(folder):
    """The content of a local model folder, every file (sentence-transformers folders hold more
    than a Qwen3 checkpoint's three kinds of files); None for a Hub id."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(folder)).encode())
        with open(file, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:32]


def main(args):
    from sentence_transformers import SentenceTransformer
    check_out(args.out, "OUT", kind="file", owned=ours_file)  # replaces only a vectors file
    columns, rows = read_csv(args.csv)
    require_columns(args.csv, columns, [args.id_col], "--id-col")
    check_ids(args.csv, rows, args.id_col)
    texts = row_texts(args.csv, columns, rows, args.text_template)
    model = SentenceTransformer(args.model, device=args.device)
    pooling = [getattr(m, "pooling_mode", None) or m.get_pooling_mode_str() for m in model
               if type(m).__name__ == "Pooling"]  # the attribute, or the method of older versions
    vectors = model.encode(texts, batch_size=args.batch_size, prompt=args.prompt,
                           normalize_embeddings=not args.no_normalize, convert_to_tensor=True,
                           show_progress_bar=not args.quiet).cpu()
    settings = {"model": args.model, "model_identity": folder_identity(args.model),
                "pooling": pooling[0] if pooling else None, "normalize": not args.no_normalize,
                "prompt": args.prompt, "max_seq_length": model.max_seq_length,
                "text_template": args.text_template}
    write_vectors(args.out, [row[args.id_col] for row in rows], vectors,
                  {"embedder": "sentence-transformers", "settings": settings})
    print(f"wrote {args.out}: {tuple(vectors.shape)} from {args.model} "
          f"({json.dumps({k: v for k, v in settings.items() if k != 'text_template'})})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="a sentence-transformers model: Hub id or folder")
    p.add_argument("csv", help="the rows to embed (header row, UTF-8)")
    p.add_argument("out", help="the vectors file to write (safetensors)")
    p.add_argument("--text-template", default=MAP_TEMPLATE, help="as train.py's")
    p.add_argument("--id-col", default="row_id", help="as train.py's")
    p.add_argument("--prompt", default=None, help="a prompt put before every text")
    p.add_argument("--no-normalize", action="store_true", help="keep the vectors' lengths")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="None: sentence-transformers' choice")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, OSError) as e:  # OSError: a model sentence-transformers cannot load
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
