//! Graph's `/subscriptions` endpoint: create, renew, delete, each one request on the one Graph
//! request path ([`GraphClient::send`]): the same deadline, size cap, request ids, redaction
//! and error classification as every other Graph call.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::auth::AccessToken;
use crate::graph::{GraphClient, GraphError, RequestIds};

/// A page of the subscription list: Graph pages it (about 100 per page).
const MAX_LIST_BODY: usize = 4 * 1024 * 1024;
/// Pages of the subscription list read at most.
const MAX_LIST_PAGES: usize = 50;

/// A subscription as `GET /subscriptions` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedSubscription {
    pub id: String,
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub notification_url: Option<String>,
}

#[derive(Deserialize)]
struct ListPage {
    value: Vec<ListedSubscription>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
}

/// What calsync asks Graph to subscribe to.
pub struct NewSubscription<'a> {
    pub mailbox: &'a str,
    pub notification_url: &'a str,
    pub lifecycle_url: &'a str,
    pub expires_at: DateTime<Utc>,
    pub client_state: &'a SecretString,
}

/// A subscription as Graph answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionBody {
    id: String,
    expiration_date_time: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// Graph no longer has it (expired or removed): create a new one.
    #[error("Graph has no such subscription (HTTP 404) [{0}]")]
    NotFound(RequestIds),
    #[error(transparent)]
    Graph(GraphError),
}

impl From<GraphError> for SubscriptionError {
    fn from(e: GraphError) -> Self {
        match e {
            GraphError::NotFound { ids, .. } => Self::NotFound(ids),
            other => Self::Graph(other),
        }
    }
}

impl SubscriptionError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Graph(e) => e.retry_after(),
            Self::NotFound(_) => None,
        }
    }

    /// The Graph error behind it, for the tenant's breaker.
    pub fn graph(&self) -> Option<&GraphError> {
        match self {
            Self::Graph(e) => Some(e),
            Self::NotFound(_) => None,
        }
    }
}

#[derive(Clone)]
pub struct SubscriptionClient {
    graph: GraphClient,
    /// A create waits for Graph's validation request to us before Graph answers.
    create_deadline: Duration,
}

impl SubscriptionClient {
    pub fn new(graph: GraphClient, create_deadline: Duration) -> Self {
        Self {
            graph,
            create_deadline,
        }
    }

    /// `POST /subscriptions`: Graph validates the notification URL before it answers 201.
    pub async fn create(
        &self,
        new: &NewSubscription<'_>,
        token: &AccessToken,
    ) -> Result<Subscription, SubscriptionError> {
        let body = serde_json::json!({
            "changeType": "created,updated,deleted",
            "notificationUrl": new.notification_url,
            "lifecycleNotificationUrl": new.lifecycle_url,
            "resource": format!("/users/{}/events", new.mailbox),
            "expirationDateTime": new.expires_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "clientState": new.client_state.expose_secret(),
        });
        let request = self
            .graph
            .post(self.graph.url(&["subscriptions"]), &[201, 200])
            .json(body, Some(new.client_state))
            .deadline(self.create_deadline);
        let answer = self.graph.send(request, token).await?;
        parse(&answer.body, new.expires_at, answer.ids)
    }

    /// `PATCH /subscriptions/{id}` with a new expiry.
    pub async fn renew(
        &self,
        id: &str,
        expires_at: DateTime<Utc>,
        token: &AccessToken,
    ) -> Result<Subscription, SubscriptionError> {
        let body = serde_json::json!({
            "expirationDateTime": expires_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        let request = self
            .graph
            .patch(self.graph.url(&["subscriptions", id]), &[200])
            .json(body, None);
        let answer = self.graph.send(request, token).await?;
        parse(&answer.body, expires_at, answer.ids)
    }

    /// `GET /subscriptions`: the app's subscriptions in the token's tenant, every page (a next
    /// link to another host ends the list, like a delta page's).
    pub async fn list(
        &self,
        token: &AccessToken,
    ) -> Result<Vec<ListedSubscription>, SubscriptionError> {
        let mut all = Vec::new();
        let mut url = self.graph.url(&["subscriptions"]);
        for _ in 0..MAX_LIST_PAGES {
            let request = self.graph.get(url.clone()).max_body(MAX_LIST_BODY);
            let answer = self.graph.send(request, token).await?;
            let page: ListPage = serde_json::from_slice(&answer.body).map_err(|e| {
                SubscriptionError::Graph(GraphError::Malformed {
                    reason: format!("subscription list: {e}"),
                    ids: answer.ids,
                })
            })?;
            all.extend(page.value);
            match page.next_link.as_deref().map(|l| self.graph.check_link(l)) {
                Some(Ok(next)) => url = next,
                _ => break,
            }
        }
        Ok(all)
    }

    /// `DELETE /subscriptions/{id}`; one already gone counts as deleted.
    pub async fn delete(&self, id: &str, token: &AccessToken) -> Result<(), SubscriptionError> {
        let request = self
            .graph
            .delete(self.graph.url(&["subscriptions", id]), &[204, 200]);
        match self
            .graph
            .send(request, token)
            .await
            .map_err(SubscriptionError::from)
        {
            Ok(_) | Err(SubscriptionError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn parse(
    body: &[u8],
    asked: DateTime<Utc>,
    ids: RequestIds,
) -> Result<Subscription, SubscriptionError> {
    let parsed: SubscriptionBody = serde_json::from_slice(body).map_err(|e| {
        SubscriptionError::Graph(GraphError::Malformed {
            reason: format!("subscription body: {e}"),
            ids,
        })
    })?;
    Ok(Subscription {
        id: parsed.id,
        // Graph may grant less than asked; it says so in the answer.
        expires_at: parsed.expiration_date_time.unwrap_or(asked),
    })
}
