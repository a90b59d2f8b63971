"""The one place email addresses are normalized before they are stored.

Every email that enters the `contacts` table passes through
`normalize_email`, so the unique index on it means one row per address.
"""

from __future__ import annotations

import unicodedata

from email_validator import EmailNotValidError, validate_email

from mapper.errors import InvalidEmail

MAX_EMAIL_LENGTH = 254

# Characters a person cannot see, which would make two rows for one address
# or let a look-alike address pass: controls, formatting marks (zero-width
# spaces, bidi overrides), and separators other than the plain space.
INVISIBLE_CATEGORIES = {"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp", "Zs"}


def normalize_email(raw: str) -> str:
    """Return the canonical form of an email address, or raise `InvalidEmail`.

    Surrounding white space is trimmed; an invisible character anywhere
    else is refused. The domain is lowercased and written in its IDNA
    ASCII form, so `Bob@BÜCHER.de` and `Bob@xn--bcher-kva.de` are one
    address. The local part is kept as given, in Unicode NFC.
    """
    email = raw.strip()
    if not email:
        raise InvalidEmail("Expected an email address, got an empty value.")
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidEmail(f"Expected at most {MAX_EMAIL_LENGTH} characters.")
    if any(unicodedata.category(char) in INVISIBLE_CATEGORIES for char in email):
        raise InvalidEmail("Expected no invisible or control characters.")

    try:
        checked = validate_email(email, check_deliverability=False)
    except EmailNotValidError as exc:
        # The library's message can quote parts of the address; keep it out.
        raise InvalidEmail("Expected a valid email address.") from exc

    local_part = unicodedata.normalize("NFC", checked.local_part)
    return f"{local_part}@{checked.ascii_domain.lower()}"
