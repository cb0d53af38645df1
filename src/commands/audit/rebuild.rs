//! `tally audit --fix`: the Lago event of an acked event that Lago lost, rebuilt byte for byte.
//!
//! The ack dropped the event's JSON but kept where its line is (`source_file`, `source_offset`),
//! the line's hash, the subscription and the code. The line is read again, checked against the
//! hash (a rotated-away or rewritten file is refused, not guessed at) and turned into the same
//! event: same transaction_id, code, subscription, timestamp and properties. If Lago had it
//! after all, the resend is a duplicate (422 `value_already_exist`), which the sender acks.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};

use crate::ship::amount::Markup;
use crate::ship::event::EventBody;
use crate::ship::outbox::{Outbox, OutboxError, Rebuilt};
use crate::ship::resolve::{CustomerIds, content_hash};
use crate::spend::SpendRecord;

/// Longest line read back (the shipper's default line limit).
const MAX_LINE: u64 = 1024 * 1024;

/// The rebuilt event, or why it cannot be rebuilt (`Ok(Err(why))`). `precise_amount` is the
/// shipper's `TALLY_PRECISE_AMOUNT` setting: the ack did not keep whether the event had one.
pub fn missing_event(
    ob: &Outbox,
    transaction_id: &str,
    precise_amount: Option<Markup>,
) -> Result<Result<Rebuilt, String>, OutboxError> {
    let Some(origin) = ob.acked_origin(transaction_id)? else {
        return Ok(Err("no longer acked in the outbox".into()));
    };
    let (Some(file), Some(offset), Some(sub), Some(code)) = (
        origin.source_file,
        origin.source_offset,
        origin.subscription_id,
        origin.code,
    ) else {
        return Ok(Err(
            "acked before tally kept the event's code (outbox schema v5); replay its spend log \
             into a fresh state directory to resend it"
                .into(),
        ));
    };
    let line = match read_line(&file, offset) {
        Ok(line) => line,
        Err(e) => {
            return Ok(Err(format!(
                "cannot read its spend-log line at {file}:{offset}: {e}"
            )));
        }
    };
    let line = line.strip_suffix(b"\r").unwrap_or(&line);
    if content_hash(line) != origin.content_hash {
        return Ok(Err(format!(
            "the line at {file}:{offset} is no longer the one that was acked (rotated or rewritten)"
        )));
    }
    let record = match SpendRecord::parse_line(line) {
        Ok(r) if r.transaction_id == transaction_id => r,
        Ok(_) => {
            return Ok(Err(format!(
                "the line at {file}:{offset} has another transaction_id"
            )));
        }
        Err(e) => {
            return Ok(Err(format!(
                "the line at {file}:{offset} does not parse: {e}"
            )));
        }
    };
    Ok(Ok(Rebuilt {
        transaction_id: record.transaction_id.clone(),
        external_subscription_id: sub,
        code,
        body: EventBody::of(&record, precise_amount),
        customer_ids: CustomerIds::of(&record),
    }))
}

fn read_line(path: &str, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut line = Vec::new();
    BufReader::new(file.take(MAX_LINE)).read_until(b'\n', &mut line)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(line)
}
