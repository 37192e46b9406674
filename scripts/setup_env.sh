#!/usr/bin/env bash
# Create the project environment on a fresh Debian machine: system packages, then a venv.
set -euo pipefail
VENV=${1:-.venv}
# the corpus synthesizers (espeak-ng, flite, festival and its three English voices), sox and flac
need_apt=()
for pkg in espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox flac; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup_env: missing Debian packages: ${need_apt[*]} (run: sudo apt-get install -y ${need_apt[*]})" >&2
    exit 1
  fi
  echo "setup_env: installing Debian packages: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip<26" wheel
# torch first, so fairseq resolves against exactly this build.
"$VENV/bin/python" -m pip install -q torch==2.11.0 torchaudio==2.11.0
"$VENV/bin/python" -m pip install -q -e ".[train,runtime,test]"
"$VENV/bin/python" -c "import fairseq, torch, torchaudio, sentencepiece, jiwer, soundfile; print('setup_env: torch', torch.__version__, 'fairseq', fairseq.__version__)"
