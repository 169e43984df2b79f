"""Learning-quality benchmark: does training make the set model (K = 4) beat one embedding?

1. Generates an ambiguous region-feature dataset in the SCAN precomputed layout
   (`{split}_ims.npy` N x 36 x 2048, `{split}_caps.txt` 5 per image, `{split}_ids.txt`): every
   image holds 3-6 coloured objects (80 types, 12 colours) among noise and clutter regions, and
   each of its 5 captions names only 1-2 of them ("a photo of a red car next to a dog"), so one
   image must match captions about different things. Converts it with `setdiv shards precomp`
   and builds the vocabulary (`setdiv vocab` where it exists, else `Vocab.build`).
2. Trains the variants of `VARIANTS` with `setdiv train` at reduced width (`Width`, `Recipe`),
   exports the final checkpoint, evaluates with `setdiv eval --protocol coco` on the test split
   and on the first 1000 train images (train vs test RSUM tells under- from over-fitting).
3. Trains a minimal reference written here in plain PyTorch from docs/method.md §2-§4 (nothing from
   setdiv) on the same files, and scores it with its own recall computation.
4. Prints a markdown table (mean ± std over seeds); writes `results.md` and `results.json`.

The code: `variants` (what is trained), `data` (the dataset), `runner` (setdiv runs),
`reference` (plain PyTorch, nothing from setdiv), `report` (the table), `main` (the command
line). The entry point is `tools/bench_learning.py`:

    python tools/bench_learning.py                  # default table, ~33 min on a 2-core CPU
    python tools/bench_learning.py --quick          # smoke run, ~1.5 min
    python tools/bench_learning.py --variants k4,k1,ref_k4 --dropout off,on --seeds 0,1
    python tools/bench_learning.py --runs k4_hardest:off,ref_k4_hardest:off

Data, shards and runs live under --work (the data is reused while its spec is unchanged).
"""
