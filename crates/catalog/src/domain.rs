//! The catalog's domain core: what a product is, which values are valid, and
//! the SQL that stores it. REST and gRPC are two thin doors into this module;
//! neither validates nor queries on its own, so the two transports cannot
//! drift apart and a benchmark between them compares transports, not code.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, TryStreamExt, stream};
use lab_core::error::DependencyError;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;
/// StreamProducts reads the table in keyset batches of this size, so a long
/// stream never holds a transaction or a connection while the client reads.
const STREAM_BATCH: u32 = 500;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Product {
    /// UUID v7, assigned by the server.
    pub id: Uuid,
    /// 1–64 of `A-Z`, `0-9`, `-`; unique.
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    /// ISO 4217 code, three upper-case letters.
    pub currency: String,
    pub tags: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The fields a client sends to create a product.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// 1–64 of `A-Z`, `0-9`, `-`; unique.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Z0-9-]{1,64}$")]
    pub sku: String,
    /// 1–200 characters, not all blank.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// At most 2000 characters.
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub description: String,
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub price_cents: i64,
    /// ISO 4217 code, three upper-case letters.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// At most 20 tags, each 1–32 characters.
    #[serde(default)]
    #[schema(max_items = 20)]
    pub tags: Vec<String>,
}

/// A partial update: only the fields that are present change.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Z0-9-]{1,64}$")]
    pub sku: Option<String>,
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[schema(max_length = 2000)]
    pub description: Option<String>,
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub price_cents: Option<i64>,
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: Option<String>,
    #[schema(max_items = 20)]
    pub tags: Option<Vec<String>>,
}

/// A product as a listing reads it, with the listing's snapshot.
#[derive(sqlx::FromRow)]
struct ListedProduct {
    #[sqlx(flatten)]
    product: Product,
    snapshot: String,
}

/// One page of a keyset-paginated listing.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Page {
    pub products: Vec<Product>,
    /// Pass back as `page_token` for the next page; `null` on the last page.
    pub next_page_token: Option<String>,
}

/// Everything that can go wrong, in the catalog's own words. Each transport
/// maps it once: to an HTTP status in `rest`, to a gRPC code in `grpc`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no product with id {0}")]
    NotFound(Uuid),
    #[error("a product with sku {0:?} already exists")]
    DuplicateSku(String),
    /// Postgres is down (503/UNAVAILABLE), or a query failed (500/INTERNAL).
    #[error(transparent)]
    Dependency(#[from] DependencyError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        message: message.into(),
    }
}

fn validate_sku(sku: &str) -> Result<()> {
    let ok_chars = sku
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-');
    if sku.is_empty() || sku.len() > 64 || !ok_chars {
        return Err(invalid("sku", "must be 1-64 characters of A-Z, 0-9 and -"));
    }
    Ok(())
}

/// Postgres text cannot hold NUL; refuse it here rather than fail in SQL.
fn no_nul(field: &'static str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<()> {
    no_nul("name", name)?;
    let len = name.chars().count();
    if len == 0 || len > 200 || name.trim().is_empty() {
        return Err(invalid("name", "must be 1-200 characters, not all blank"));
    }
    Ok(())
}

fn validate_description(description: &str) -> Result<()> {
    no_nul("description", description)?;
    if description.chars().count() > 2000 {
        return Err(invalid("description", "must be at most 2000 characters"));
    }
    Ok(())
}

fn validate_price(price_cents: i64) -> Result<()> {
    if !(0..=1_000_000_000).contains(&price_cents) {
        return Err(invalid("price_cents", "must be between 0 and 1000000000"));
    }
    Ok(())
}

fn validate_currency(currency: &str) -> Result<()> {
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid(
            "currency",
            "must be three upper-case letters, like EUR",
        ));
    }
    Ok(())
}

fn validate_tags(tags: &[String]) -> Result<()> {
    if tags.len() > 20 {
        return Err(invalid("tags", "at most 20 tags"));
    }
    for tag in tags {
        no_nul("tags", tag)?;
    }
    if let Some(bad) = tags.iter().find(|t| t.is_empty() || t.chars().count() > 32) {
        return Err(invalid(
            "tags",
            format!("each tag must be 1-32 characters, got {bad:?}"),
        ));
    }
    Ok(())
}

impl NewProduct {
    pub fn validate(&self) -> Result<()> {
        validate_sku(&self.sku)?;
        validate_name(&self.name)?;
        validate_description(&self.description)?;
        validate_price(self.price_cents)?;
        validate_currency(&self.currency)?;
        validate_tags(&self.tags)
    }
}

impl ProductPatch {
    pub fn validate(&self) -> Result<()> {
        self.sku.as_deref().map(validate_sku).transpose()?;
        self.name.as_deref().map(validate_name).transpose()?;
        self.description
            .as_deref()
            .map(validate_description)
            .transpose()?;
        self.price_cents.map(validate_price).transpose()?;
        self.currency
            .as_deref()
            .map(validate_currency)
            .transpose()?;
        self.tags.as_deref().map(validate_tags).transpose()?;
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.sku.is_none()
            && self.name.is_none()
            && self.description.is_none()
            && self.price_cents.is_none()
            && self.currency.is_none()
            && self.tags.is_none()
    }
}

/// Product ids arrive as text on both transports.
pub fn parse_id(id: &str) -> Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| invalid("id", format!("{id:?} is not a UUID")))
}

/// Where a listing stands: after which id it goes on, and the snapshot its
/// first page was read in (Postgres's `pg_snapshot` text, `xmin:xmax:xip,…`).
///
/// Paging by id alone skips rows: ids (UUID v7) are taken before the INSERT
/// commits, so a lower id can commit after a higher one was served, behind
/// the reader. The same hazard as an outbox relay that reads `id >
/// last_seen`. Carrying the first page's snapshot fixes which products the
/// listing serves: those whose creating transaction had committed at the
/// first page, each exactly once (unless deleted before its page is read);
/// one created later is not served at all (list again to see it). Values
/// are read as each page is: this is a fixed membership, not a snapshot of
/// the rows' contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub after: Uuid,
    pub snapshot: String,
}

/// The page token is opaque to clients: the cursor, base64url-encoded, so
/// clients do not start building tokens themselves.
fn encode_token(cursor: &Cursor) -> String {
    let mut bytes = cursor.after.as_bytes().to_vec();
    bytes.extend_from_slice(cursor.snapshot.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_token(token: &str) -> Result<Cursor> {
    let refuse = || invalid("page_token", "not a token returned by this service");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| refuse())?;
    if bytes.len() < 16 {
        return Err(refuse());
    }
    let after = Uuid::from_slice(&bytes[..16]).map_err(|_| refuse())?;
    let snapshot = std::str::from_utf8(&bytes[16..]).map_err(|_| refuse())?;
    let snapshot = canonical_snapshot(snapshot).ok_or_else(refuse)?;
    Ok(Cursor { after, snapshot })
}

/// `xmin:xmax:xip,…` as Postgres accepts it (xmin ≤ each xip < xmax, in
/// ascending order), or None: a forged token is a 422, never a SQL error.
fn canonical_snapshot(text: &str) -> Option<String> {
    let mut parts = text.split(':');
    let (xmin, xmax, xips) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || text.len() > 4096 {
        return None;
    }
    let (xmin, xmax): (u64, u64) = (xmin.parse().ok()?, xmax.parse().ok()?);
    let xips: Vec<u64> = if xips.is_empty() {
        Vec::new()
    } else {
        xips.split(',')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?
    };
    let ordered = xips.windows(2).all(|w| w[0] < w[1]);
    let bounded = xips.iter().all(|x| (xmin..xmax).contains(x));
    (xmin >= 1 && xmin <= xmax && ordered && bounded).then(|| {
        let list: Vec<String> = xips.iter().map(u64::to_string).collect();
        format!("{xmin}:{xmax}:{}", list.join(","))
    })
}

/// The catalog: validation plus storage, shared by both transports.
#[derive(Clone)]
pub struct Catalog {
    pool: PgPool,
}

impl Catalog {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    #[tracing::instrument(skip_all, fields(product.sku = %new.sku))]
    pub async fn create(&self, new: NewProduct) -> Result<Product> {
        new.validate()?;
        sqlx::query_as(
            "INSERT INTO products (id, sku, name, description, price_cents, currency, tags)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             RETURNING id, sku, name, description, price_cents, currency, tags, created_at, updated_at",
        )
        .bind(Uuid::now_v7())
        .bind(&new.sku)
        .bind(&new.name)
        .bind(&new.description)
        .bind(new.price_cents)
        .bind(&new.currency)
        .bind(&new.tags)
        .fetch_one(&self.pool)
        .await
        .map_err(|err| self.db_error(err, Some(&new.sku)))
    }

    #[tracing::instrument(skip_all, fields(product.id = %id))]
    pub async fn get(&self, id: &str) -> Result<Product> {
        let id = parse_id(id)?;
        sqlx::query_as(
            "SELECT id, sku, name, description, price_cents, currency, tags, created_at, updated_at
             FROM products WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| self.db_error(err, None))?
        .ok_or(Error::NotFound(id))
    }

    /// Keyset pagination: `WHERE id > last ORDER BY id`. Unlike OFFSET, a
    /// page costs the same however deep it is, and rows inserted while a
    /// client pages never shift the window. Keyset alone still skips rows
    /// whose lower id commits after a higher one was served (ids are taken
    /// before commit), so every page also reads in the first page's snapshot
    /// ([`Cursor`]): the listing serves exactly the products committed when
    /// it began, each once.
    #[tracing::instrument(skip_all)]
    pub async fn list(&self, page_size: Option<u32>, page_token: Option<&str>) -> Result<Page> {
        let size = page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        if !(1..=MAX_PAGE_SIZE).contains(&size) {
            return Err(invalid("page_size", format!("must be 1-{MAX_PAGE_SIZE}")));
        }
        let cursor = match page_token {
            Some(token) if !token.is_empty() => Some(decode_token(token)?),
            _ => None,
        };
        let (mut products, snapshot) = self.page_after(cursor.as_ref(), size + 1).await?;
        let next_page_token = if products.len() > size as usize {
            products.truncate(size as usize);
            products.last().map(|p| {
                encode_token(&Cursor {
                    after: p.id,
                    snapshot: snapshot.clone(),
                })
            })
        } else {
            None
        };
        Ok(Page {
            products,
            next_page_token,
        })
    }

    /// Every product, in id order, as a stream of keyset batches read in
    /// one snapshot (the first batch's), like a listing.
    pub fn stream_all(&self) -> impl Stream<Item = Result<Product>> + Send + 'static {
        let catalog = self.clone();
        stream::try_unfold(Some(None), move |state: Option<Option<Cursor>>| {
            let catalog = catalog.clone();
            async move {
                let Some(cursor) = state else {
                    return Ok::<_, Error>(None);
                };
                let (batch, snapshot) = catalog.page_after(cursor.as_ref(), STREAM_BATCH).await?;
                let next = if batch.len() < STREAM_BATCH as usize {
                    None
                } else {
                    batch.last().map(|p| {
                        Some(Cursor {
                            after: p.id,
                            snapshot: snapshot.clone(),
                        })
                    })
                };
                Ok(Some((stream::iter(batch.into_iter().map(Ok)), next)))
            }
        })
        .try_flatten()
        .boxed()
    }

    /// Up to `limit` products after the cursor, in the cursor's snapshot (or,
    /// for a first page, in this statement's, which is returned).
    async fn page_after(
        &self,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<(Vec<Product>, String)> {
        let (after, snapshot) = match cursor {
            Some(c) => (Some(c.after), Some(c.snapshot.clone())),
            None => (None, None),
        };
        let rows: Vec<ListedProduct> = sqlx::query_as(
            "WITH s AS (SELECT coalesce($3::text::pg_snapshot, pg_current_snapshot()) AS snap)
             SELECT id, sku, name, description, price_cents, currency, tags, created_at,
                    updated_at, s.snap::text AS snapshot
             FROM products, s
             WHERE ($1::uuid IS NULL OR id > $1) AND pg_visible_in_snapshot(created_xid, s.snap)
             ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .bind(snapshot.as_deref())
        .fetch_all(&self.pool)
        .await
        .map_err(|err| self.db_error(err, None))?;
        let snapshot = match (rows.first(), snapshot) {
            (_, Some(known)) => known,
            (Some(row), None) => row.snapshot.clone(),
            (None, None) => String::new(), // nothing listed: no next page either
        };
        Ok((rows.into_iter().map(|r| r.product).collect(), snapshot))
    }

    #[tracing::instrument(skip_all, fields(product.id = %id))]
    pub async fn update(&self, id: &str, patch: ProductPatch) -> Result<Product> {
        let uuid = parse_id(id)?;
        patch.validate()?;
        if patch.is_empty() {
            return self.get(id).await;
        }
        sqlx::query_as(
            "UPDATE products SET
                sku = COALESCE($2, sku),
                name = COALESCE($3, name),
                description = COALESCE($4, description),
                price_cents = COALESCE($5, price_cents),
                currency = COALESCE($6, currency),
                tags = COALESCE($7, tags),
                updated_at = now()
             WHERE id = $1
             RETURNING id, sku, name, description, price_cents, currency, tags, created_at, updated_at",
        )
        .bind(uuid)
        .bind(&patch.sku)
        .bind(&patch.name)
        .bind(&patch.description)
        .bind(patch.price_cents)
        .bind(&patch.currency)
        .bind(&patch.tags)
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| self.db_error(err, patch.sku.as_deref()))?
        .ok_or(Error::NotFound(uuid))
    }

    #[tracing::instrument(skip_all, fields(product.id = %id))]
    pub async fn delete(&self, id: &str) -> Result<()> {
        let id = parse_id(id)?;
        let done = sqlx::query("DELETE FROM products WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(|err| self.db_error(err, None))?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound(id));
        }
        Ok(())
    }

    fn db_error(&self, err: sqlx::Error, sku: Option<&str>) -> Error {
        if let sqlx::Error::Database(db) = &err
            && db.is_unique_violation()
        {
            return Error::DuplicateSku(sku.unwrap_or_default().to_owned());
        }
        DependencyError::postgres(&self.pool, &err).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NewProduct {
        NewProduct {
            sku: "MUG-1".into(),
            name: "Mug".into(),
            description: String::new(),
            price_cents: 1299,
            currency: "EUR".into(),
            tags: vec!["kitchen".into()],
        }
    }

    fn field_of(result: Result<()>) -> &'static str {
        match result {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_product_passes() {
        valid().validate().unwrap();
    }

    #[test]
    fn each_rule_names_its_field() {
        type Breaker = Box<dyn Fn(&mut NewProduct)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("sku", Box::new(|p| p.sku = "mug-1".into())),
            ("sku", Box::new(|p| p.sku = "A".repeat(65))),
            ("name", Box::new(|p| p.name = String::new())),
            ("name", Box::new(|p| p.name = "x".repeat(201))),
            (
                "description",
                Box::new(|p| p.description = "x".repeat(2001)),
            ),
            ("price_cents", Box::new(|p| p.price_cents = -1)),
            ("price_cents", Box::new(|p| p.price_cents = 1_000_000_001)),
            ("currency", Box::new(|p| p.currency = "eur".into())),
            ("tags", Box::new(|p| p.tags = vec!["t".into(); 21])),
            ("tags", Box::new(|p| p.tags = vec![String::new()])),
            ("name", Box::new(|p| p.name = "nul\0".into())),
            ("description", Box::new(|p| p.description = "\0".into())),
            ("tags", Box::new(|p| p.tags = vec!["a\0".into()])),
        ];
        for (field, break_it) in cases {
            let mut product = valid();
            break_it(&mut product);
            assert_eq!(field_of(product.validate()), field);
        }
    }

    #[test]
    fn page_tokens_round_trip_and_garbage_is_rejected() {
        let cursor = Cursor {
            after: Uuid::now_v7(),
            snapshot: "100:105:101,103".into(),
        };
        assert_eq!(decode_token(&encode_token(&cursor)).unwrap(), cursor);
        let forged = |snapshot: &str| {
            let mut bytes = cursor.after.as_bytes().to_vec();
            bytes.extend_from_slice(snapshot.as_bytes());
            URL_SAFE_NO_PAD.encode(bytes)
        };
        for token in [
            "not-a-token".to_owned(),
            forged("105:100:"),        // xmin after xmax
            forged("100:105:103,101"), // out of order
            forged("100:105:99"),      // below xmin
            forged("100:105:1;DROP"),  // not a number
            forged(""),
        ] {
            assert!(
                matches!(
                    decode_token(&token),
                    Err(Error::Invalid {
                        field: "page_token",
                        ..
                    })
                ),
                "{token}"
            );
        }
    }
}
