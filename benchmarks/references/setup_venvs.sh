#!/usr/bin/env bash
# The two reference environments of benchmarks/test_reference_methods.py, outside the repository:
#
#   bash benchmarks/references/setup_venvs.sh [DIR]      (DIR defaults to ~/.cache/quantbench/reference-venvs)
#
# then point the benchmark at their interpreters:
#
#   export QB_LLMCOMPRESSOR_PYTHON=DIR/llmc/bin/python QB_GPTQMODEL_PYTHON=DIR/gptqmodel/bin/python
#
# Each pins its own transformers (llm-compressor 0.14 took 5.17, GPTQModel 7.6 took 5.23), which
# is why neither is a dependency of quantbench. torch==2.13.0 goes in first: on a CPU-only machine
# it resolves to the CPU wheel, and the libraries accept it, so their resolvers leave it alone
# (a bare torch requirement would pull a multi-GB CUDA build). GPTQModel 7.7 needs torch >= 2.14.1.
set -euo pipefail
DIR=${1:-$HOME/.cache/quantbench/reference-venvs}
mkdir -p "$DIR"

python3 -m venv "$DIR/llmc"
"$DIR/llmc/bin/pip" install torch==2.13.0
"$DIR/llmc/bin/pip" install "llmcompressor==0.14.0.1"

python3 -m venv "$DIR/gptqmodel"
"$DIR/gptqmodel/bin/pip" install torch==2.13.0
"$DIR/gptqmodel/bin/pip" install "gptqmodel==7.6.0"   # a pure-Python sdist; its CPU kernels compile on first use

"$DIR/llmc/bin/python" -c "import llmcompressor, torch; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__)"
"$DIR/gptqmodel/bin/python" -c "import gptqmodel, torch; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__)"
