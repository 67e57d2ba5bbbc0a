# One image for every Loyalty service and the HTTP gateway; the compose file picks one by its command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock

COPY protos ./protos
COPY tools ./tools
COPY libs ./libs
COPY services ./services
COPY pyproject.toml README.md ./
# Stubs are generated in the image from protos/, exactly as `python3 dev.py` does on a laptop.
RUN python -m tools.gen_protos && echo "/app\n/app/gen" > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/loyalty.pth"

RUN useradd --system --uid 10001 loyalty && mkdir -p /state && chown loyalty /state
USER loyalty
ENV LOYALTY_STATE_DIR=/state LOYALTY_HOST=0.0.0.0
EXPOSE 50051 50052 50053 50054 8080
CMD ["python", "-m", "tools.cli", "--help"]
