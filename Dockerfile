# The image the Kubernetes manifests name (launch.image:launch.tag); it mirrors the README set-up (`make venv`):
# Python 3.11, a C compiler + ninja for DeepSpeed's JIT-built op, the pinned requirements, the package in
# editable mode. Code lives in /opt/mango (the manifests' workingDir).
#   docker build -t mango-pipeline:0.1.0 . && docker push <registry>/mango-pipeline:0.1.0
# On Linux x86_64, PyPI's torch==2.13.0 wheel is the CUDA build; the CPU-only wheel used on the CI box would
# come from https://download.pytorch.org/whl/cpu (pass --build-arg TORCH_INDEX=... to pick it).
FROM python:3.11-slim

ARG TORCH_INDEX=""
# build-essential: DeepSpeed JIT-compiles a CPU op on first use, and the flow's C++ ICA node is built below; procps: pgrep for launch/templates/node.sh;
# git: the code snapshot records the commit
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential procps git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mango
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
COPY requirements.txt pyproject.toml ./
RUN python -m pip install --upgrade pip \
    && if [ -n "$TORCH_INDEX" ]; then python -m pip install --index-url "$TORCH_INDEX" torch==2.13.0; fi \
    && python -m pip install -r requirements.txt
COPY . .
RUN python -m pip install --no-deps -e . \
    && python -c "import pipeline, jobs.train, jobs.launch" \
    && python -c "from pipeline.flows.kernels import native; assert native.load() is not None, 'C++ ICA node build failed'"

# every launcher's entry point is jobs.train; the manifests set the command (node.sh + torchrun)
CMD ["python", "-m", "jobs.train", "--help"]
