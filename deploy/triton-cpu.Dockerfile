# The development guard image: NGC Triton with the CPU guard of triton_models/cpu baked in.
#
# Build from the repository root:
#   docker build -f deploy/triton-cpu.Dockerfile -t REGISTRY/guardstream-triton-cpu:0.1.0 .
# BuildKit reads deploy/triton-cpu.Dockerfile.dockerignore, which sends only triton_models/cpu,
# triton_models/common and triton_models/fill.py.
#
# It stands in for the production TensorRT-LLM guard on clusters without GPUs: same model name
# (`guard`), same tensor contract. It judges exposed nudity (O4) only. NudeNet's weights derive
# from Ultralytics YOLOv8 (AGPL-3.0): mind that licence before pushing this image anywhere public.
#
# The -py3 image carries the Python backend. Its stub runs the image's system Python, which in
# the 24.xx releases is Ubuntu 22.04's Python 3.10, so the guard's packages are installed there.

# The model repository, rendered as the embedded stack renders it (service/dev/stack.py):
# fill.py copies triton_models/common's modules next to each model.py, the only place the Python
# backend imports them from. A stage of its own, so the image holds the result, not the sources;
# the same base image, so the stage costs no other download.
FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS models
COPY triton_models /src/triton_models
RUN python3 /src/triton_models/fill.py /src/triton_models/cpu /models


FROM nvcr.io/nvidia/tritonserver:24.10-py3

# The CPU guard's packages and their dependencies, every one pinned, so the image is the same
# whenever it is built. The versions follow deploy/constraints.txt except where Python 3.10 forces
# otherwise:
# - onnxruntime 1.23.2: the newest release with cp310 wheels (constraints.txt pins 1.31.1, built
#   for Python >= 3.11 only). NudeNet needs only its CPU execution provider.
# - numpy < 2 (1.26.4): with numpy 2 the Python-backend stub cannot return BYTES outputs.
# - coloredlogs, humanfriendly, sympy, mpmath: onnxruntime's dependencies, not in the consumer's
#   constraints; protobuf, flatbuffers and packaging are pinned as constraints.txt pins them.
RUN python3 -m pip install --no-cache-dir \
      nudenet==3.4.2 \
      onnxruntime==1.23.2 \
      numpy==1.26.4 \
      opencv-python-headless==4.11.0.86 \
      coloredlogs==15.0.1 \
      humanfriendly==10.0 \
      flatbuffers==25.12.19 \
      packaging==26.3 \
      protobuf==6.33.6 \
      sympy==1.14.0 \
      mpmath==1.3.0

# The model repository, read-only to the server's user (root owns it).
COPY --from=models /models /models

# The base image's unprivileged user, triton-server (the image's build asserts uid and gid 1000),
# numeric so that Kubernetes can verify runAsNonRoot.
USER 1000:1000

# HTTP (health, inference), gRPC (the consumer), Prometheus metrics.
EXPOSE 8000 8001 8002

# The base image's ENTRYPOINT (nvidia_entrypoint.sh) runs this command.
CMD ["tritonserver", "--model-repository=/models"]
