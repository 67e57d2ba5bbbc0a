"""`loyalty texts list|set|reset --service rewards|scoring`: the member-facing texts a service
ships in zh-CN and en, and the operators' wording that overrides them (no release needed).

    list   ListMessageTexts: each key in each language, the wording in force and its placeholders
    set    UpdateMessageText: a new wording for one key in one language (audited)
    reset  UpdateMessageText with an empty template: the shipped wording again (audited)
"""

from __future__ import annotations

import argparse
from typing import Any

from loyalty.common.v1 import messages_pb2
from loyalty.rewards.v1 import rewards_pb2, rewards_pb2_grpc
from loyalty.scoring.v1 import scoring_service_pb2, scoring_service_pb2_grpc
from tools.commands.evaluations import SCORING
from tools.ops import (
    EXIT_OK,
    REWARDS,
    add_action,
    add_group,
    as_json,
    call,
    list_command,
    new_request_id,
    positive_int,
    table,
    timestamp,
)

# service -> (its pb2 module, stub class, service descriptor)
SERVICES: dict[str, tuple[Any, Any, Any]] = {
    "rewards": (rewards_pb2, rewards_pb2_grpc.RewardsServiceStub, REWARDS),
    "scoring": (scoring_service_pb2, scoring_service_pb2_grpc.ScoringServiceStub, SCORING),
}
LANGUAGES = ("zh-CN", "en")


def texts_table(found: list[messages_pb2.MessageText]) -> str:
    return table([(t.key, t.language_tag, "yes" if t.customized else "-", ", ".join(t.params) or "-",
                   t.template.replace("\n", " ")) for t in found],
                 ("key", "language", "custom", "placeholders", "text in force"))


def _cmd_list(args: argparse.Namespace) -> int:
    module, stub, descriptor = SERVICES[args.service]
    request = module.ListMessageTextsRequest(key_prefix=args.prefix or "", language_tag=args.language or "")
    return list_command(args, args.service, stub, descriptor, "ListMessageTexts", request, "message_texts",
                        "no texts", texts_table)


def _update(args: argparse.Namespace, template: str) -> int:
    module, stub, descriptor = SERVICES[args.service]
    request = module.UpdateMessageTextRequest(request_id=args.request_id or new_request_id(), key=args.key,
                                              language_tag=args.language, template=template)
    reply = call(args, args.service, stub, descriptor, lambda s: s.UpdateMessageText(request, timeout=args.timeout))
    text: messages_pb2.MessageText = reply.message_text
    if args.json:
        print(as_json(text))
    elif text.customized:
        print(f"{args.service} {text.key} [{text.language_tag}] set by {text.updated_by} at "
              f"{timestamp(text.updated_at)} UTC: {text.template}")
    else:
        print(f"{args.service} {text.key} [{text.language_tag}] is the shipped text again: {text.template}")
    return EXIT_OK


def _cmd_set(args: argparse.Namespace) -> int:
    return _update(args, args.template)


def _cmd_reset(args: argparse.Namespace) -> int:
    return _update(args, "")


def _service_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--service", required=True, choices=sorted(SERVICES), help="whose texts")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions = add_group(sub, "texts", "member-facing texts in zh-CN and en: list them, re-word them, restore them")
    listing = add_action(actions, "list", _cmd_list, "a service's message catalogue with the wording in force")
    _service_option(listing)
    listing.add_argument("--prefix", metavar="KEY_PREFIX", help="only keys starting with this, e.g. dispute.")
    listing.add_argument("--language", choices=LANGUAGES, help="only this language")
    listing.add_argument("--limit", type=positive_int, default=200, help="most texts listed (default 200)")
    setting = add_action(
        actions, "set", _cmd_set, "re-word one key in one language (UpdateMessageText, audited)",
        "Re-word one key in one language; members see it within seconds, no restart. The wording may use only "
        "the key's placeholders ({name}; {{ and }} for literal braces).\n\n"
        "  loyalty texts set dispute.rejected --service rewards --language en \\\n"
        "      --template 'We checked again: the decision stands.'")
    _service_option(setting)
    setting.add_argument("key")
    setting.add_argument("--language", required=True, choices=LANGUAGES)
    setting.add_argument("--template", required=True, help="the new wording")
    setting.add_argument("--request-id", help="idempotency key: repeat it to retry the same change safely")
    reset = add_action(actions, "reset", _cmd_reset, "restore the shipped wording of one key in one language")
    _service_option(reset)
    reset.add_argument("key")
    reset.add_argument("--language", required=True, choices=LANGUAGES)
    reset.add_argument("--request-id", help="idempotency key: repeat it to retry the same change safely")
