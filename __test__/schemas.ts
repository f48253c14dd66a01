/**
 * JSON schemas of the kinds clients send (OpenAI structured outputs, zod and
 * pydantic exports): nested objects, bounded arrays, enums, bounded numbers,
 * patterns and formats, unions, optional fields and `$ref`. Strings carry a
 * `maxLength` where a small model could otherwise write until `max_tokens`.
 */
const str = (maxLength = 24) => ({ type: 'string', maxLength });

export const SCHEMAS: Array<Record<string, unknown>> = [
  { type: 'object', properties: { name: str(), age: { type: 'integer', minimum: 0, maximum: 120 } }, required: ['name', 'age'], additionalProperties: false },
  { type: 'object', properties: { ok: { type: 'boolean' } }, required: ['ok'], additionalProperties: false },
  { type: 'object', properties: { color: { enum: ['red', 'green', 'blue'] } }, required: ['color'], additionalProperties: false },
  { type: 'object', properties: { tags: { type: 'array', items: str(12), minItems: 1, maxItems: 3 } }, required: ['tags'], additionalProperties: false },
  { type: 'object', properties: { score: { type: 'number', minimum: 0, maximum: 1 } }, required: ['score'], additionalProperties: false },
  { type: 'object', properties: { code: { type: 'string', pattern: '^[A-Z]{3}-[0-9]{3}$' } }, required: ['code'], additionalProperties: false },
  { type: 'object', properties: { when: { type: 'string', format: 'date' } }, required: ['when'], additionalProperties: false },
  { type: 'object', properties: { email: { type: 'string', format: 'email', maxLength: 40 } }, required: ['email'], additionalProperties: false },
  { type: 'object', properties: { id: { type: 'string', format: 'uuid' } }, required: ['id'], additionalProperties: false },
  {
    type: 'object',
    properties: { user: { type: 'object', properties: { first: str(), last: str() }, required: ['first', 'last'], additionalProperties: false } },
    required: ['user'],
    additionalProperties: false,
  },
  {
    type: 'object',
    properties: {
      items: {
        type: 'array',
        items: { type: 'object', properties: { sku: str(10), qty: { type: 'integer', minimum: 1, maximum: 99 } }, required: ['sku', 'qty'], additionalProperties: false },
        minItems: 1,
        maxItems: 2,
      },
    },
    required: ['items'],
    additionalProperties: false,
  },
  { type: 'object', properties: { value: { anyOf: [{ type: 'integer', minimum: 0, maximum: 9 }, str(8)] } }, required: ['value'], additionalProperties: false },
  { type: 'object', properties: { title: str(), subtitle: str() }, required: ['title'], additionalProperties: false },
  {
    type: 'object',
    $defs: { point: { type: 'object', properties: { x: { type: 'integer', minimum: -9, maximum: 9 }, y: { type: 'integer', minimum: -9, maximum: 9 } }, required: ['x', 'y'], additionalProperties: false } },
    properties: { from: { $ref: '#/$defs/point' }, to: { $ref: '#/$defs/point' } },
    required: ['from', 'to'],
    additionalProperties: false,
  },
  { type: 'array', items: { type: 'integer', minimum: 0, maximum: 100 }, minItems: 2, maxItems: 4 },
  { type: 'string', enum: ['low', 'medium', 'high'] },
  { type: 'integer', minimum: 10, maximum: 20 },
  { type: 'boolean' },
  { type: 'object', properties: { kind: { const: 'circle' }, radius: { type: 'number', minimum: 0, maximum: 10 } }, required: ['kind', 'radius'], additionalProperties: false },
  {
    type: 'object',
    properties: {
      shape: {
        anyOf: [
          { type: 'object', properties: { kind: { const: 'square' }, side: { type: 'integer', minimum: 1, maximum: 9 } }, required: ['kind', 'side'], additionalProperties: false },
          { type: 'object', properties: { kind: { const: 'dot' } }, required: ['kind'], additionalProperties: false },
        ],
      },
    },
    required: ['shape'],
    additionalProperties: false,
  },
  { type: 'object', properties: { matrix: { type: 'array', items: { type: 'array', items: { type: 'integer', minimum: 0, maximum: 9 }, minItems: 2, maxItems: 2 }, minItems: 2, maxItems: 2 } }, required: ['matrix'], additionalProperties: false },
  { type: 'object', properties: { nickname: { type: ['string', 'null'], maxLength: 16 } }, required: ['nickname'], additionalProperties: false },
  { type: 'object', properties: { price: { type: 'number', exclusiveMinimum: 0, maximum: 1000 }, currency: { enum: ['EUR', 'USD'] } }, required: ['price', 'currency'], additionalProperties: false },
  { type: 'object', properties: { hex: { type: 'string', pattern: '^#[0-9a-f]{6}$' } }, required: ['hex'], additionalProperties: false },
  { type: 'object', properties: { at: { type: 'string', format: 'date-time' } }, required: ['at'], additionalProperties: false },
  { type: 'object', properties: { count: { type: 'integer', multipleOf: 5, minimum: 0, maximum: 50 } }, required: ['count'], additionalProperties: false },
  { type: 'object', properties: { words: { type: 'array', items: { enum: ['alpha', 'beta', 'gamma'] }, minItems: 3, maxItems: 3 } }, required: ['words'], additionalProperties: false },
  {
    type: 'object',
    properties: {
      person: {
        type: 'object',
        properties: {
          name: str(),
          address: { type: 'object', properties: { city: str(), zip: { type: 'string', pattern: '^[0-9]{5}$' } }, required: ['city', 'zip'], additionalProperties: false },
        },
        required: ['name', 'address'],
        additionalProperties: false,
      },
    },
    required: ['person'],
    additionalProperties: false,
  },
  { type: 'object', properties: { short: { type: 'string', minLength: 3, maxLength: 5 } }, required: ['short'], additionalProperties: false },
  { type: 'object', properties: { answer: { type: 'string', enum: ['yes', 'no'] }, confidence: { type: 'integer', minimum: 0, maximum: 100 } }, required: ['answer', 'confidence'], additionalProperties: false },
  {
    type: 'object',
    $defs: { node: { type: 'object', properties: { label: str(8), leaf: { type: 'boolean' } }, required: ['label', 'leaf'], additionalProperties: false } },
    properties: { root: { $ref: '#/$defs/node' }, children: { type: 'array', items: { $ref: '#/$defs/node' }, maxItems: 2 } },
    required: ['root', 'children'],
    additionalProperties: false,
  },
  { type: 'object', properties: { empty: { type: 'object', properties: {}, additionalProperties: false } }, required: ['empty'], additionalProperties: false },
  { type: 'object', properties: { level: { type: 'integer', enum: [1, 2, 3] }, label: { type: 'string', const: 'fixed' } }, required: ['level', 'label'], additionalProperties: false },
];
