# chatbackend: one image for the ASGI server (web), the Celery worker and migrations.
#   docker compose up --build        (see docker-compose.yml and README.md)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes. Every package
# ships manylinux wheels (psycopg[binary], uvloop, httptools), so no compiler is needed.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .

# Static files (admin, Swagger UI) are collected into the image; no database or secret is needed.
RUN DJANGO_SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app

USER app
EXPOSE 8000

# The web command; docker-compose.yml overrides it for the worker and the migrate service.
CMD ["uvicorn", "chatbackend.asgi:application", "--host", "0.0.0.0", "--port", "8000", \
     "--workers", "2", "--lifespan", "on", "--timeout-graceful-shutdown", "10", \
     "--no-proxy-headers"]
