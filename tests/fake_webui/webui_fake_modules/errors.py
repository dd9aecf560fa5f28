import logging

logger = logging.getLogger("fake_webui")
reported: list[str] = []


def report(message, exc_info=False):
    reported.append(message)
    logger.error(message, exc_info=exc_info)
