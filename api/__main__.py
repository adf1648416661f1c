"""`python -m api`: Flask's development server on PORT (default 8080). Production uses gunicorn:

    gunicorn -c deploy/gunicorn.conf.py 'api:create_app()'
"""

from __future__ import annotations

from api import create_app
from api.extensions import get_settings
from shared import logs


def main() -> None:
    """Serve the API with threads, so open event streams do not block other requests."""
    app = create_app()
    with app.app_context():
        settings = get_settings()
    logs.configure(settings)  # LOG_FORMAT and LOG_LEVEL, as under gunicorn
    app.run(host="0.0.0.0", port=settings.port, threaded=True)


if __name__ == "__main__":
    main()
