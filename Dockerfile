# The image every pod of configs/cluster/*.yaml runs: Ray's own image for Ray 2.60 on Python 3.11 with CUDA (the
# user, paths and `ray start` that KubeRay expects), with this project and its configs at /opt/rerank-pipeline, so
# a RayJob's entrypoint names its config by that absolute path and needs no working_dir upload.
#   docker build -t rerank-pipeline:0.1.0 .
#   docker build --build-arg FLASH_ATTN_VERSION=2.8.3 -t rerank-pipeline:0.1.0-flash .  # compiles flash-attn
# Then push it where the cluster pulls from and name it in the manifests (image: rerank-pipeline:0.1.0).
FROM rayproject/ray:2.60.0-py311-gpu

# The torch this project is tested with (pyproject.toml says only >=2.4, so that a GPU machine keeps its own build).
ARG TORCH_VERSION=2.13.0
# Empty: no flash-attn (the scorer then uses PyTorch's SDPA); a version: built against the image's CUDA and torch.
ARG FLASH_ATTN_VERSION=""

# Ray's image runs as its unprivileged user `ray` (uid 1000, group 100: users); the project folder is theirs, so the
# install below (setuptools writes its egg-info beside the sources) and Ray's workers can use it.
USER 0
RUN mkdir -p /opt/rerank-pipeline && chown 1000:100 /opt/rerank-pipeline
USER 1000:100
WORKDIR /opt/rerank-pipeline

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 pipeline/ pipeline/
COPY --chown=1000:100 jobs/ jobs/
COPY --chown=1000:100 configs/ configs/

# Not editable: the image's jobs and configs are what it was built from. No `ray.init()` at build time: it would
# leave ~/.ray/auth_token in the image and change how every pod's `ray start` authenticates.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" . \
    && if [ -n "${FLASH_ATTN_VERSION}" ]; then \
        pip install --no-cache-dir --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi
