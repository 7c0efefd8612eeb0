//! Fair dispatch: which due mailboxes get the free worker slots. Pure, so it is tested alone.

use std::collections::{BTreeMap, VecDeque};

use crate::store::DueMailbox;

/// Picks up to `free` of `candidates` (requested syncs first, then oldest due, within each
/// tenant): tenants take turns, tenants with a requested sync first, then the tenant whose
/// oldest mailbox has waited longest, and no tenant gets more than
/// `allowance(tenant)` (0 for a tenant whose breaker is open: its mailboxes wait without
/// holding a slot).
pub fn pick(
    candidates: Vec<DueMailbox>,
    free: usize,
    mut allowance: impl FnMut(&str) -> usize,
) -> Vec<DueMailbox> {
    let mut queues: BTreeMap<String, VecDeque<DueMailbox>> = BTreeMap::new();
    for c in candidates {
        queues.entry(c.tenant.clone()).or_default().push_back(c);
    }
    let mut turns: Vec<(String, usize, VecDeque<DueMailbox>)> = queues
        .into_iter()
        .filter_map(|(tenant, mut queue)| {
            let allowed = allowance(&tenant);
            if allowed == 0 {
                return None;
            }
            queue
                .make_contiguous()
                .sort_by_key(|c| (!c.requested, c.next_run_at, c.id));
            Some((tenant, allowed, queue))
        })
        .collect();
    turns.sort_by_key(|(_, _, q)| q.front().map(|c| (!c.requested, c.next_run_at, c.id)));
    let mut picked = Vec::with_capacity(free);
    while picked.len() < free {
        let mut progressed = false;
        for (_, allowed, queue) in turns.iter_mut() {
            if picked.len() == free {
                break;
            }
            if *allowed == 0 {
                continue;
            }
            if let Some(next) = queue.pop_front() {
                picked.push(next);
                *allowed -= 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn due(id: i64, tenant: &str, minute: u32) -> DueMailbox {
        DueMailbox {
            id,
            tenant: tenant.into(),
            next_run_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, minute, 0).unwrap(),
            requested: false,
        }
    }

    #[test]
    fn requested_syncs_go_first_within_and_across_tenants() {
        let requested = |id, tenant, minute| DueMailbox {
            requested: true,
            ..due(id, tenant, minute)
        };
        let candidates = vec![
            due(1, "a", 0),
            requested(2, "a", 9),
            due(3, "b", 1),
            requested(4, "c", 8),
            due(5, "c", 2),
        ];
        let ids: Vec<i64> = pick(candidates, 5, |_| 10).iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![4, 2, 3, 5, 1]);
    }

    #[test]
    fn tenants_take_turns_oldest_first() {
        let candidates = vec![
            due(1, "a", 1),
            due(2, "a", 2),
            due(3, "a", 3),
            due(4, "b", 0),
            due(5, "b", 5),
            due(6, "c", 4),
        ];
        let ids: Vec<i64> = pick(candidates, 5, |_| 10).iter().map(|c| c.id).collect();
        assert_eq!(
            ids,
            vec![4, 1, 6, 5, 2],
            "b (oldest) first, then a, then c, round-robin"
        );
    }

    #[test]
    fn allowance_caps_a_tenant_and_zero_excludes_it() {
        let candidates = vec![
            due(1, "a", 0),
            due(2, "a", 1),
            due(3, "a", 2),
            due(4, "b", 3),
            due(5, "open", 0),
        ];
        let ids: Vec<i64> = pick(candidates, 10, |t| match t {
            "a" => 2,
            "open" => 0,
            _ => 5,
        })
        .iter()
        .map(|c| c.id)
        .collect();
        assert_eq!(
            ids,
            vec![1, 4, 2],
            "a capped at 2; the open tenant holds nothing"
        );
    }

    #[test]
    fn one_busy_tenant_cannot_take_every_slot() {
        let mut candidates: Vec<DueMailbox> = (0..100).map(|i| due(i, "busy", 0)).collect();
        candidates.push(due(1000, "quiet", 30));
        let picked = pick(candidates, 4, |_| 3);
        assert_eq!(picked.iter().filter(|c| c.tenant == "busy").count(), 3);
        assert!(picked.iter().any(|c| c.tenant == "quiet"));
    }
}
