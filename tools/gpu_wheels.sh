#!/usr/bin/env bash
# Build .whl/: wheels for CPython 3.12 (x86_64) of what setdiv needs and the lent GPU machine's
# image lacks (it has torch, transformers, numpy, ...; no deepspeed, webdataset, omegaconf,
# nltk, faiss, eccv-caption, timm, open_clip). tools/gpu_check.sh installs them there with no index. Run here,
# from the repository root, with .venv/ made by tools/bootstrap.sh (deepspeed's pure wheel is
# built with it: PyPI has only its sdist). About 26 MB; .whl/ is git-ignored locally
# (`echo /.whl/ >> .git/info/exclude`) and travels with the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl/extra
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 "$@"
}
download -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 hjson==3.1.0 omegaconf==2.4.0 webdataset==1.0.2 \
    braceexpand==0.1.7 nltk==3.10.4 defusedxml==0.7.1 eccv-caption==0.1.0 faiss-cpu==1.15.1 \
    timm==1.0.31 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# pydantic 2.14 needs typing-extensions>=4.16: installed there only if the image's is older.
download -d .whl/extra typing-extensions==4.16.0
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation \
    deepspeed==0.19.8 -w .whl
du -sh .whl
