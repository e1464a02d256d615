import logging

from prunekit.report import console_summaries


def test_summaries_print_once_inside_the_block_and_the_logger_is_restored(capsys):
    logger = logging.getLogger("prunekit.methods.example")
    root_handler = logging.StreamHandler()  # a caller's own setup must not print the line a second time
    logging.getLogger().addHandler(root_handler)
    try:
        with console_summaries():
            logger.info("step 1: remove attn 3")
        logger.info("after the block")
    finally:
        logging.getLogger().removeHandler(root_handler)
    err = capsys.readouterr().err
    assert err.count("step 1: remove attn 3") == 1
    assert "after the block" not in err  # INFO is hidden again once the block ends
    package = logging.getLogger("prunekit")
    assert package.level == logging.NOTSET and package.propagate and not package.handlers
