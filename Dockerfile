# CPU image that sets edgetl up and runs the demo (make demo) on the built-in example.
#   docker build -t edgetl . && docker run --rm edgetl
# Not built in CI here (no Docker engine on the development machines); the same steps run there
# through `make demo` / `make test`.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/edgetl
# CPU-only PyTorch keeps the image ~4 GB smaller than the default CUDA build.
RUN pip install --no-cache-dir torch torchvision --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md Makefile ./
COPY src ./src
COPY targets ./targets
RUN python -m venv --system-site-packages .venv && .venv/bin/pip install --no-cache-dir -e '.[train,test]' \
    && touch .venv/.edgetl-installed
COPY benchmarks ./benchmarks
COPY tests ./tests
CMD ["make", "demo"]
