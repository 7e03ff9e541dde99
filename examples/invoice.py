"""`invoice`: a flow of three nodes, validate -> price -> summarize.

Shows a multi-node graph: each node gets the previous node's result as its message
payload (the gateway keeps every message's `Headers(tenant=...)`), nodes are built
fresh for each job, and a bad input fails the job for good with a `JobError` code of
its own.

Payload: `{"currency": "EUR", "tax_rate": 0.2, "lines": [{"sku": "a", "qty": 2,
"unit_price": 9.5}, ...]}`. Result: `{"currency", "lines", "net", "tax", "total"}`.

    GATEWAY_FLOWS=examples.invoice gateway run     # with the repository on PYTHONPATH
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from gateway import FlowGraph, JobContext, JobError, JobTypes, Message, Node, NodePolicy

__all__ = ["register"]

_CENT = Decimal("0.01")
_MAX_LINES = 1000


def _invalid(why: str) -> JobError:
    return JobError(why, retryable=False, code="invalid_invoice")


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _invalid(f"{name} must be a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise _invalid(f"{name} must be a number") from None
    if not number.is_finite() or number < 0:
        raise _invalid(f"{name} must be a finite number >= 0")
    return number


async def validate(message: Message, _: Any) -> Any:
    """Check the shape; pass on normalised lines."""
    payload = message.payload
    lines = payload.get("lines")
    if not isinstance(lines, list) or not 0 < len(lines) <= _MAX_LINES:
        raise _invalid(f"lines must be a list of 1 to {_MAX_LINES} items")
    normalised = []
    for index, line in enumerate(lines):
        if not isinstance(line, dict) or not isinstance(line.get("sku"), str):
            raise _invalid(f"line {index} needs a sku")
        qty = _decimal(line.get("qty"), f"line {index} qty")
        price = _decimal(line.get("unit_price"), f"line {index} unit_price")
        normalised.append({"sku": line["sku"], "qty": str(qty), "unit_price": str(price)})
    currency = payload.get("currency", "EUR")
    if not isinstance(currency, str) or len(currency) != 3:
        raise _invalid("currency must be a 3-letter code")
    rate = _decimal(payload.get("tax_rate", 0), "tax_rate")
    return {"currency": currency, "tax_rate": str(rate), "lines": normalised}


async def price(message: Message, _: Any) -> Any:
    """Amount per line, rounded to cents (banker's rounding)."""
    invoice = dict(message.payload)
    priced = []
    for line in invoice["lines"]:
        amount = (Decimal(line["qty"]) * Decimal(line["unit_price"])).quantize(
            _CENT, rounding=ROUND_HALF_EVEN
        )
        priced.append({**line, "amount": str(amount)})
    invoice["lines"] = priced
    return invoice


async def summarize(message: Message, _: Any) -> Any:
    """Totals; the flow's result."""
    invoice = message.payload
    net = sum((Decimal(line["amount"]) for line in invoice["lines"]), Decimal(0))
    tax = (net * Decimal(invoice["tax_rate"])).quantize(_CENT, rounding=ROUND_HALF_EVEN)
    return {
        "currency": invoice["currency"],
        "lines": len(invoice["lines"]),
        "net": str(net),
        "tax": str(tax),
        "total": str(net + tax),
    }


def invoice(ctx: JobContext) -> FlowGraph:
    """The three nodes, wired in a line; built fresh for every job."""
    policy = NodePolicy(validate="none", timeout_s=5.0)
    first = Node(validate, name="validate", policy=policy)
    second = Node(price, name="price", policy=policy)
    third = Node(summarize, name="summarize", policy=policy)
    return [(first, [second]), (second, [third]), (third, [])]


def register(types: JobTypes) -> None:
    """Called by the gateway for `GATEWAY_FLOWS=examples.invoice`."""
    types.register("invoice", invoice)
