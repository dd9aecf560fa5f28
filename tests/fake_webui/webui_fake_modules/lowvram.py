sent_to_cpu = []


def is_enabled(sd_model):
    return bool(getattr(sd_model, "lowvram", False))


def send_everything_to_cpu():
    sent_to_cpu.append(1)
